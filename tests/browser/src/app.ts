// The page under test: calls metadata-service over gRPC-Web (connect-web's
// fetch-based transport) from the page's origin, with a frontend token, and
// reports every outcome as plain JSON for run.mjs (page.evaluate).
//
// Configuration: ?server=http://127.0.0.1:PORT&token=JWT in the page's URL,
// or window.__config = {server, token} set before the page loads.

import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { type JsonObject, create, toJson } from "@bufbuild/protobuf";
import {
  MergeUserMetadataRequestSchema,
  type UserMetadata,
  type UserMetadataEvent,
  UserMetadataEventSchema,
  UserMetadataSchema,
  UserMetadataService,
  WatchUserMetadataRequestSchema,
} from "../gen/metadata/v1/metadata_pb.js";

interface Config {
  server: string;
  token: string;
}

declare global {
  interface Window {
    __config?: Partial<Config>;
    run: (step: string, args?: Record<string, unknown>) => Promise<Outcome>;
    ready: boolean;
  }
}

/** What a step reports: ok with a value, or the error as the page sees it. */
type Outcome =
  | { ok: true; value: unknown }
  | {
      ok: false;
      /** ConnectError.code, the number (7 = PermissionDenied). */
      code: number;
      /** Its name in Code ("PermissionDenied"). */
      codeName: string;
      message: string;
      rawMessage: string;
      /** Anything not a ConnectError (a bug in the page). */
      notConnectError?: string;
    };

function config(): Config {
  const query = new URLSearchParams(window.location.search);
  const server = window.__config?.server ?? query.get("server");
  const token = window.__config?.token ?? query.get("token");
  if (!server || !token) {
    throw new Error("the page needs ?server=...&token=... (or window.__config)");
  }
  return { server, token };
}

const { server, token } = config();
const transport = createGrpcWebTransport({
  baseUrl: server,
  // tonic-web speaks application/grpc-web+proto, not +json.
  useBinaryFormat: true,
  // Sends grpc-timeout: the preflight must allow it.
  defaultTimeoutMs: 10_000,
  interceptors: [
    (next) => async (req) => {
      req.header.set("authorization", `Bearer ${token}`);
      return next(req);
    },
  ],
});
const users = createClient(UserMetadataService, transport);

/** A UserMetadata as JSON, plus which metadata fields are set at all. */
function user(message: UserMetadata | undefined) {
  if (message === undefined) {
    return null;
  }
  return {
    json: toJson(UserMetadataSchema, message),
    has: {
      public: message.publicMetadata !== undefined,
      private: message.privateMetadata !== undefined,
      unsafe: message.unsafeMetadata !== undefined,
    },
  };
}

function event(message: UserMetadataEvent) {
  return {
    json: toJson(UserMetadataEventSchema, message),
    before: user(message.before),
    after: user(message.after),
  };
}

function failure(err: unknown): Outcome {
  const error = ConnectError.from(err);
  return {
    ok: false,
    code: error.code,
    codeName: Code[error.code],
    message: error.message,
    rawMessage: error.rawMessage,
    ...(err instanceof ConnectError ? {} : { notConnectError: String(err) }),
  };
}

async function outcome(call: () => Promise<unknown>): Promise<Outcome> {
  try {
    return { ok: true, value: await call() };
  } catch (err) {
    return failure(err);
  }
}

/** The one Watch stream of this page: its events, its end, and its header. */
const watch = {
  abort: null as AbortController | null,
  events: [] as ReturnType<typeof event>[],
  end: null as Outcome | null,
  headers: null as Record<string, string> | null,
  wake: [] as (() => void)[],
};

function notify() {
  for (const wake of watch.wake.splice(0)) {
    wake();
  }
}

/** Resolves on the next change to `watch`, or after `ms`. */
function changed(ms: number): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    watch.wake.push(() => {
      clearTimeout(timer);
      resolve();
    });
  });
}

async function until(ready: () => boolean, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (!ready()) {
    const rest = deadline - Date.now();
    if (rest <= 0) {
      return false;
    }
    await changed(rest);
  }
  return true;
}

function startWatch(userIds: string[]) {
  if (watch.abort) {
    throw new Error("a watch is already running");
  }
  const abort = new AbortController();
  watch.abort = abort;
  const request = create(WatchUserMetadataRequestSchema, { userIds });
  void (async () => {
    try {
      const stream = users.watch(request, {
        signal: abort.signal,
        // A stream stays open: no deadline.
        timeoutMs: 0,
        onHeader(headers) {
          watch.headers = Object.fromEntries(headers.entries());
          notify();
        },
      });
      for await (const response of stream) {
        if (response.response.case === "event") {
          watch.events.push(event(response.response.value));
          notify();
        }
      }
      watch.end = { ok: true, value: "stream ended" };
    } catch (err) {
      watch.end = failure(err);
    }
    notify();
  })();
}

const steps: Record<string, (args: Record<string, unknown>) => Promise<Outcome>> = {
  /** Get a user's record. */
  get: (args) =>
    outcome(async () => user(await users.get({ userId: String(args.userId) }))),

  /** Merge: args.publicMetadata / privateMetadata / unsafeMetadata, JSON objects. */
  merge: (args) =>
    outcome(async () => {
      const request = create(MergeUserMetadataRequestSchema, {
        userId: String(args.userId),
        publicMetadata: args.publicMetadata as JsonObject | undefined,
        privateMetadata: args.privateMetadata as JsonObject | undefined,
        unsafeMetadata: args.unsafeMetadata as JsonObject | undefined,
      });
      return user(await users.merge(request));
    }),

  /**
   * Starts watching args.userIds; ok once the response headers arrived
   * (the server has taken the stream), else the stream's error.
   */
  watchStart: async (args) => {
    startWatch((args.userIds as string[]).map(String));
    const ms = Number(args.timeoutMs ?? 10_000);
    if (!(await until(() => watch.headers !== null || watch.end !== null, ms))) {
      return failure(new ConnectError(`no response headers within ${ms} ms`, Code.DeadlineExceeded));
    }
    if (watch.headers === null) {
      return watch.end as Outcome;
    }
    return { ok: true, value: { headers: watch.headers } };
  },

  /** The events received so far, once there are args.count (or the stream ended). */
  watchEvents: async (args) => {
    const count = Number(args.count ?? 1);
    const ms = Number(args.timeoutMs ?? 10_000);
    await until(() => watch.events.length >= count || watch.end !== null, ms);
    if (watch.events.length === 0 && watch.end !== null && !watch.end.ok) {
      return watch.end;
    }
    return { ok: true, value: { events: watch.events, ended: watch.end } };
  },

  /** Cancels the stream. */
  watchStop: async () => {
    watch.abort?.abort();
    return { ok: true, value: null };
  },
};

window.run = async (step, args = {}) => {
  const run = steps[step];
  if (!run) {
    throw new Error(`no step ${step}`);
  }
  const result = await run(args);
  const log = document.getElementById("log");
  if (log) {
    log.textContent += `${step} ${JSON.stringify(args)} -> ${JSON.stringify(result)}\n`;
  }
  return result;
};
window.ready = true;
