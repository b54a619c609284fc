// ProbeClient: a thin typed client over the generated ProbeService descriptor and Connect's gRPC
// transport for Node (HTTP/2). Same methods, results and errors as the Python client.

import { create } from "@bufbuild/protobuf";
import { type Client, type Transport, createClient } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";

import { statusCode, toProbeServeError } from "./errors.js";
import {
  AdminService,
  type LoadBundleResponse,
  type UnloadBundleResponse,
} from "./gen/probeserve/v1/admin_service_pb.js";
import {
  type ExtractRequest,
  ExtractRequestSchema,
  type ExtractResponse,
  type ExtractResult as ExtractResultMessage,
  type ExtractStreamRequest,
  ExtractStreamRequestSchema,
  type BundleInfo as BundleInfoMessage,
  type GetInfoResponse,
  Precision,
  ProbeService,
} from "./gen/probeserve/v1/probe_service_pb.js";
import {
  type BundleInfo,
  type BundleList,
  Extraction,
  type ExtractResult,
  type Item,
  type LoadedBundle,
  type ServerInfo,
  type UnloadedBundle,
} from "./types.js";

/** TLS settings: a CA to trust (PEM), a client certificate and key for mTLS, the server's name. */
export interface TlsOptions {
  ca?: string | Buffer;
  cert?: string | Buffer;
  key?: string | Buffer;
  /** The name the server's certificate is for, when it is not the target's host. */
  serverName?: string;
}

export interface ProbeClientOptions {
  /** Default deadline of every call in milliseconds (30 000); 0: none. A call's own overrides. */
  timeoutMs?: number;
  /** Headers (gRPC metadata) sent with every call, before a call's own. */
  headers?: Record<string, string>;
  /** Bearer token, sent as `authorization: Bearer <token>` with every call. */
  token?: string;
  /** `true`: TLS with the system's CA roots; or the TLS settings. Plaintext when absent. */
  tls?: boolean | TlsOptions;
}

export interface CallOptions {
  /** This call's deadline in milliseconds; the client's default otherwise. */
  timeoutMs?: number;
  /** Aborting it cancels the call (the server aborts its engine work); the call rejects with
   * a ProbeServeError CANCELLED. */
  signal?: AbortSignal;
  /** Headers (gRPC metadata) for this call, after the client's. */
  headers?: Record<string, string>;
}

/** How LoadBundle serves a bundle: under `name` (default: its own), replacing one, as default. */
export interface LoadBundleOptions extends CallOptions {
  name?: string;
  replace?: boolean;
  makeDefault?: boolean;
}

export interface ExtractOptions extends CallOptions {
  /** Echoed in the result and the server's log; the server assigns one when empty. */
  requestId?: string;
  /** The bundle to answer with; the server's default when empty. */
  bundle?: string;
}

const DEFAULT_TIMEOUT_MS = 30_000;

function toRequest(item: Item): ExtractRequest {
  if (Array.isArray(item)) {
    const [fn, utterance] = item as readonly [string, string];
    return create(ExtractRequestSchema, { function: fn, utterance });
  }
  const { function: fn, utterance, requestId = "", bundle = "" } = item as Exclude<Item, readonly unknown[]>;
  return create(ExtractRequestSchema, { function: fn, utterance, requestId, bundle });
}

function fromResponse(response: ExtractResponse): Extraction {
  // Span fields the server left unset (absent slots) are undefined, as the proto's `optional` says.
  const slots = response.slots.map((s) => ({
    name: s.name,
    present: s.present,
    presenceProbability: s.presenceProbability,
    value: s.value,
    charStart: s.charStart,
    charEnd: s.charEnd,
    tokenStart: s.tokenStart,
    tokenEnd: s.tokenEnd,
    startProbability: s.startProbability,
    endProbability: s.endProbability,
  }));
  return new Extraction(response.requestId, slots, response.promptTokens);
}

function fromResult(result: ExtractResultMessage | undefined): ExtractResult {
  const requestId = result?.requestId ?? "";
  const outcome = result?.outcome;
  if (outcome?.case === "response") {
    return { requestId, ok: true, extraction: fromResponse(outcome.value) };
  }
  if (outcome?.case === "error") {
    const { code, message } = outcome.value;
    return { requestId, ok: false, error: { code: statusCode(code), message } };
  }
  const message = "the server sent a result with no outcome";
  return { requestId, ok: false, error: { code: "INTERNAL", message } };
}

function fromBundle(b: BundleInfoMessage | undefined): BundleInfo {
  return {
    name: b?.name ?? "",
    version: b?.version ?? "",
    hiddenSize: b?.hiddenSize ?? 0,
    functions: (b?.functions ?? []).map((f) => ({
      name: f.name,
      description: f.description,
      slots: f.slots.map(({ name, type, optional, description }) => ({ name, type, optional, description })),
    })),
    utteranceSegmentation: b?.utteranceSegmentation ?? "",
    adapterSha256: b?.adapterSha256 ?? "",
    headsSha256: b?.headsSha256 ?? "",
    baseModelFingerprint: b?.baseModelFingerprint ?? "",
    isDefault: b?.isDefault ?? false,
  };
}

function fromLoaded(reply: LoadBundleResponse): LoadedBundle {
  return {
    bundle: fromBundle(reply.bundle),
    replacedVersion: reply.replacedVersion,
    loadSeconds: reply.loadSeconds,
  };
}

function fromUnloaded(reply: UnloadBundleResponse): UnloadedBundle {
  return { bundle: fromBundle(reply.bundle), drainedRequests: reply.drainedRequests };
}

function fromInfo(info: GetInfoResponse): ServerInfo {
  return {
    model: info.model,
    precision: (Precision[info.precision] ?? "UNSPECIFIED").toLowerCase(),
    bundles: info.bundles.map(fromBundle),
    maxPromptTokens: info.maxPromptTokens,
    serverVersion: info.serverVersion,
    engineVersion: info.engineVersion,
  };
}

async function* streamRequests(
  items: Iterable<Item> | AsyncIterable<Item>,
): AsyncIterable<ExtractStreamRequest> {
  for await (const item of items) {
    yield create(ExtractStreamRequestSchema, { request: toRequest(item) });
  }
}

/** The results of {@link ProbeClient.extractStream}, in request order; `cancel()` ends the call. */
export class ResultStream implements AsyncIterable<ExtractResult> {
  private readonly controller = new AbortController();
  private started = false;

  constructor(
    private readonly open: (signal: AbortSignal) => AsyncIterable<{ result?: ExtractResultMessage }>,
  ) {}

  /** Cancel the call: the server stops its work, and iteration ends without an error. */
  cancel(): void {
    this.controller.abort();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<ExtractResult> {
    if (this.started) {
      throw new Error("a ResultStream can be iterated once");
    }
    this.started = true;
    try {
      for await (const response of this.open(this.controller.signal)) {
        yield fromResult(response.result);
      }
    } catch (error) {
      const mapped = toProbeServeError(error);
      if (this.controller.signal.aborted && mapped.code === "CANCELLED") {
        return;
      }
      throw mapped;
    }
  }
}

function baseUrl(target: string, tls: boolean): string {
  if (/^https?:\/\//.test(target)) {
    return target;
  }
  return `${tls ? "https" : "http"}://${target}`;
}

/**
 * A client of one probeserve server. `target` is `host:port` (or an `http://` / `https://` URL).
 * Call {@link close} when done: the HTTP/2 connection otherwise keeps Node running.
 */
export class ProbeClient {
  private readonly client: Client<typeof ProbeService>;
  private readonly admin: Client<typeof AdminService>;
  private readonly session: Http2SessionManager;
  private readonly timeoutMs: number;
  private readonly headers: Record<string, string>;

  constructor(target: string, options: ProbeClientOptions = {}) {
    const tls = options.tls === true ? {} : options.tls || undefined;
    const url = baseUrl(target, tls !== undefined);
    const nodeOptions =
      tls === undefined ? {} : { ca: tls.ca, cert: tls.cert, key: tls.key, servername: tls.serverName };
    this.session = new Http2SessionManager(url, { pingIntervalMs: 30_000 }, nodeOptions);
    const transport: Transport = createGrpcTransport({ baseUrl: url, sessionManager: this.session });
    this.client = createClient(ProbeService, transport);
    this.admin = createClient(AdminService, transport);
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.headers = { ...options.headers };
    if (options.token) {
      this.headers.authorization = `Bearer ${options.token}`;
    }
  }

  private callOptions(options: CallOptions) {
    const timeoutMs = options.timeoutMs ?? this.timeoutMs;
    return {
      timeoutMs: timeoutMs > 0 ? timeoutMs : undefined,
      signal: options.signal,
      headers: { ...this.headers, ...options.headers },
    };
  }

  /** Extract the slots of one utterance; rejects with a ProbeServeError. */
  async extract(fn: string, utterance: string, options: ExtractOptions = {}): Promise<Extraction> {
    const { requestId, bundle } = options;
    const request = toRequest({ function: fn, utterance, requestId, bundle });
    try {
      return fromResponse(await this.client.extract(request, this.callOptions(options)));
    } catch (error) {
      throw toProbeServeError(error);
    }
  }

  /** Extract many utterances in one call; each result holds an extraction or its own error. */
  async extractBatch(items: Iterable<Item>, options: CallOptions = {}): Promise<ExtractResult[]> {
    const requests = Array.from(items, toRequest);
    try {
      const response = await this.client.extractBatch({ requests }, this.callOptions(options));
      return response.results.map(fromResult);
    } catch (error) {
      throw toProbeServeError(error);
    }
  }

  /**
   * Send `items` while results come back in request order (iterate with `for await`). A bad item
   * gets an in-band error and the stream goes on; `timeoutMs` bounds the whole call.
   */
  extractStream(items: Iterable<Item> | AsyncIterable<Item>, options: CallOptions = {}): ResultStream {
    return new ResultStream((signal) => {
      const call = this.callOptions(options);
      const signals = call.signal ? [signal, call.signal] : [signal];
      return this.client.extractStream(streamRequests(items), { ...call, signal: AbortSignal.any(signals) });
    });
  }

  /** Describe the server: model, precision, bundles with their functions and slots, versions. */
  async info(options: CallOptions = {}): Promise<ServerInfo> {
    try {
      return fromInfo(await this.client.getInfo({}, this.callOptions(options)));
    } catch (error) {
      throw toProbeServeError(error);
    }
  }

  /**
   * AdminService (a server started with `--admin`): load a bundle directory that lies on the
   * server; the pairing check runs first (FAILED_PRECONDITION when it refuses the bundle).
   */
  async loadBundle(path: string, options: LoadBundleOptions = {}): Promise<LoadedBundle> {
    const { name = "", replace = false, makeDefault = false } = options;
    try {
      const request = { path, name, replace, makeDefault };
      return fromLoaded(await this.admin.loadBundle(request, this.callOptions(options)));
    } catch (error) {
      throw toProbeServeError(error);
    }
  }

  /** AdminService: stop serving a bundle once the requests already admitted for it are answered. */
  async unloadBundle(name: string, options: CallOptions = {}): Promise<UnloadedBundle> {
    try {
      return fromUnloaded(await this.admin.unloadBundle({ name }, this.callOptions(options)));
    } catch (error) {
      throw toProbeServeError(error);
    }
  }

  /** AdminService: the loaded bundles, and the adapters the engine itself holds. */
  async bundles(options: CallOptions = {}): Promise<BundleList> {
    try {
      const reply = await this.admin.listBundles({}, this.callOptions(options));
      return { bundles: reply.bundles.map(fromBundle), engineAdapters: reply.engineAdapters };
    } catch (error) {
      throw toProbeServeError(error);
    }
  }

  /** Close the connection; calls still in flight fail with UNAVAILABLE or CANCELLED. */
  close(): void {
    this.session.abort();
  }
}

