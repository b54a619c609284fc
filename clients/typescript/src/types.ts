// Plain typed results: what the SDK returns instead of protobuf messages (as in the Python client).

import type { StatusCode } from "./errors.js";

/** One utterance to extract from. `requestId` is echoed back; empty lets the server pick one. */
export interface ExtractItem {
  function: string;
  utterance: string;
  requestId?: string;
  bundle?: string;
}

/** An item, or `[function, utterance]`. */
export type Item = ExtractItem | readonly [string, string];

/** One slot's answer. The span fields are set only when the slot is present. */
export interface Slot {
  name: string;
  present: boolean;
  presenceProbability: number;
  /** The exact substring of the utterance: its code points charStart..charEnd. */
  value?: string;
  /** Offsets in Unicode code points (Python slice convention), not UTF-16 units: for text with
   * characters outside the BMP (emoji), index `Array.from(utterance)`, not `utterance`. */
  charStart?: number;
  charEnd?: number;
  /** Indices among the utterance's tokens; tokenEnd is inclusive. */
  tokenStart?: number;
  tokenEnd?: number;
  startProbability?: number;
  endProbability?: number;
}

/** The answer to one utterance: one Slot per schema slot, sorted by name. */
export class Extraction {
  constructor(
    readonly requestId: string,
    readonly slots: readonly Slot[],
    readonly promptTokens: number,
  ) {}

  /** The present slots' values by slot name. */
  values(): Record<string, string> {
    const values: Record<string, string> = {};
    for (const slot of this.slots) {
      if (slot.present && slot.value !== undefined) {
        values[slot.name] = slot.value;
      }
    }
    return values;
  }

  /** The slot of this name; throws RangeError if the schema has none. */
  slot(name: string): Slot {
    const found = this.slots.find((s) => s.name === name);
    if (found === undefined) {
      throw new RangeError(`no slot ${JSON.stringify(name)}`);
    }
    return found;
  }
}

/** Why one item of a batch or stream got no answer. */
export interface ItemError {
  code: StatusCode;
  message: string;
}

/** The outcome of one batch or stream item: an extraction or an error, and the item's id. */
export interface ExtractResult {
  requestId: string;
  ok: boolean;
  extraction?: Extraction;
  error?: ItemError;
}

export interface SlotInfo {
  name: string;
  type: string;
  optional: boolean;
  description: string;
}

export interface FunctionInfo {
  name: string;
  description: string;
  slots: SlotInfo[];
}

/** A loaded bundle: its name (what `bundle` asks for), functions, layout and digests. */
export interface BundleInfo {
  name: string;
  version: string;
  hiddenSize: number;
  functions: FunctionInfo[];
  utteranceSegmentation: string;
  adapterSha256: string;
  headsSha256: string;
  baseModelFingerprint: string;
  /** Whether it answers requests that name no bundle. */
  isDefault: boolean;
}

/** What ListBundles reports: the loaded bundles and the adapters the engine holds. */
export interface BundleList {
  bundles: BundleInfo[];
  engineAdapters: string[];
}

/** What LoadBundle reports: the bundle now served and the version it replaced, if any. */
export interface LoadedBundle {
  bundle: BundleInfo;
  replacedVersion?: string;
  loadSeconds: number;
}

/** What UnloadBundle reports: the bundle no longer served and the requests it let finish. */
export interface UnloadedBundle {
  bundle: BundleInfo;
  drainedRequests: number;
}

/** What GetInfo reports: the model, precision ("fp32", "awq_int4", ...), bundles, versions. */
export interface ServerInfo {
  model: string;
  precision: string;
  bundles: BundleInfo[];
  maxPromptTokens: number;
  serverVersion: string;
  engineVersion: string;
}
