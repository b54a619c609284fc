// probeserve-client: typed TypeScript client for the probeserve gRPC API (Node 20+).
//
//   import { ProbeClient } from "probeserve-client";
//   const client = new ProbeClient("127.0.0.1:50051", { timeoutMs: 10_000 });
//   const result = await client.extract("get_weather", "Will it rain in Lisbon on Saturday?");
//   console.log(result.values());
//   client.close();

export {
  type CallOptions,
  type ExtractOptions,
  type LoadBundleOptions,
  ProbeClient,
  type ProbeClientOptions,
  ResultStream,
  type TlsOptions,
} from "./client.js";
export { ProbeServeError, STATUS_CODES, type StatusCode, statusCode } from "./errors.js";
export {
  type BundleInfo,
  type BundleList,
  type ExtractItem,
  Extraction,
  type ExtractResult,
  type FunctionInfo,
  type Item,
  type ItemError,
  type LoadedBundle,
  type ServerInfo,
  type Slot,
  type SlotInfo,
  type UnloadedBundle,
} from "./types.js";
