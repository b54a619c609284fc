// The one error type of the SDK, as in the Python client: a failed call rejects with a
// ProbeServeError whose `code` is the gRPC status name and `details` the server's message.

import { ConnectError } from "@connectrpc/connect";

/** gRPC status code names, indexed by their number (google.rpc.Code). */
export const STATUS_CODES = [
  "OK",
  "CANCELLED",
  "UNKNOWN",
  "INVALID_ARGUMENT",
  "DEADLINE_EXCEEDED",
  "NOT_FOUND",
  "ALREADY_EXISTS",
  "PERMISSION_DENIED",
  "RESOURCE_EXHAUSTED",
  "FAILED_PRECONDITION",
  "ABORTED",
  "OUT_OF_RANGE",
  "UNIMPLEMENTED",
  "INTERNAL",
  "UNAVAILABLE",
  "DATA_LOSS",
  "UNAUTHENTICATED",
] as const;

/** A gRPC status code name, for example "INVALID_ARGUMENT". */
export type StatusCode = (typeof STATUS_CODES)[number];

/** The name of a status code number; UNKNOWN for numbers gRPC does not define. */
export function statusCode(code: number): StatusCode {
  return STATUS_CODES[code] ?? "UNKNOWN";
}

/** A call failed: `code` is the gRPC status, `details` the server's message. */
export class ProbeServeError extends Error {
  readonly code: StatusCode;
  readonly details: string;

  constructor(code: StatusCode, details: string, options?: { cause?: unknown }) {
    super(`${code}: ${details}`, options);
    this.name = "ProbeServeError";
    this.code = code;
    this.details = details;
  }
}

/** Any error a call threw, as a ProbeServeError (Connect's errors keep their code). */
export function toProbeServeError(error: unknown): ProbeServeError {
  if (error instanceof ProbeServeError) {
    return error;
  }
  const connect = ConnectError.from(error);
  return new ProbeServeError(statusCode(connect.code), connect.rawMessage, { cause: error });
}
