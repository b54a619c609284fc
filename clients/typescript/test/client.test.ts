// The TypeScript client against a real probeserve server on the tiny test model (see server.ts):
// unary, batch, an ordered stream with an in-band error, a deadline, cancellation, errors.

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { type ExtractItem, type Extraction, ProbeClient, ProbeServeError } from "../src/index.js";
import { type TestServer, startServer } from "./server.js";

const STARTUP_TIMEOUT_MS = 300_000;
const WEATHER = "What's the weather in Berlin tomorrow, in celsius please?";

function rejectsWith(code: string, text = ""): (error: unknown) => boolean {
  return (error) => {
    assert.ok(error instanceof ProbeServeError, `expected a ProbeServeError, got ${String(error)}`);
    assert.equal(error.code, code, error.message);
    assert.ok(error.details.includes(text), error.details);
    return true;
  };
}

function checkSpans(extraction: Extraction, utterance: string): void {
  const codePoints = Array.from(utterance);
  for (const slot of extraction.slots) {
    assert.ok(slot.presenceProbability >= 0 && slot.presenceProbability <= 1);
    if (slot.present) {
      assert.equal(slot.value, codePoints.slice(slot.charStart, slot.charEnd).join(""));
      assert.ok(slot.tokenStart! <= slot.tokenEnd!);
    } else {
      assert.equal(slot.value, undefined);
    }
  }
}

describe("ProbeClient against a real server", () => {
  let server: TestServer;
  let client: ProbeClient;

  before(
    async () => {
      // The inline engine (the default), eager: a fast start; AdminService on loopback.
      server = await startServer(["--eager", "--admin"]);
      client = new ProbeClient(server.target, { timeoutMs: 60_000 });
    },
    { timeout: STARTUP_TIMEOUT_MS },
  );

  after(async () => {
    client?.close();
    await server?.stop();
  });

  it("describes the server and its bundle", async () => {
    const info = await client.info();
    assert.equal(info.precision, "fp32");
    assert.match(info.engineVersion, /^vllm /);
    assert.equal(info.bundles[0].name, "tiny");
    assert.deepEqual(
      info.bundles[0].functions.map((f) => f.name),
      ["book_flight", "get_weather"],
    );
    assert.deepEqual(
      info.bundles[0].functions[1].slots.map((s) => s.name),
      ["city", "unit"],
    );
  });

  it("extracts one utterance, echoing its request id", async () => {
    const result = await client.extract("get_weather", WEATHER, { requestId: "ts-1" });
    assert.equal(result.requestId, "ts-1");
    assert.deepEqual(
      result.slots.map((s) => s.name),
      ["city", "unit"],
    );
    assert.ok(result.promptTokens > 0);
    checkSpans(result, WEATHER);
    assert.equal(Object.keys(result.values()).length, result.slots.filter((s) => s.present).length);
    const assigned = await client.extract("get_weather", WEATHER);
    assert.equal(assigned.requestId.length, 32);
  });

  it("maps a bad request to INVALID_ARGUMENT with the server's hint", async () => {
    await assert.rejects(
      client.extract("get_wether", "rain in Oslo"),
      rejectsWith("INVALID_ARGUMENT", "did you mean 'get_weather'?"),
    );
    await assert.rejects(
      client.extract("get_weather", "rain", { bundle: "other" }),
      rejectsWith("NOT_FOUND", "'other'"),
    );
  });

  it("answers a batch item by item, errors in band", async () => {
    const results = await client.extractBatch([
      ["get_weather", "sun in Rome"],
      { function: "get_weather", utterance: "", requestId: "empty" },
      { function: "book_flight", utterance: "from Paris to Tokyo", requestId: "b3" },
    ]);
    assert.deepEqual(
      results.map((r) => r.ok),
      [true, false, true],
    );
    assert.equal(results[0].requestId.length, 32);
    assert.equal(results[1].requestId, "empty");
    assert.equal(results[1].error?.code, "INVALID_ARGUMENT");
    assert.match(results[1].error!.message, /utterance is empty/);
    assert.equal(results[2].extraction?.requestId, "b3");
  });

  it("streams answers in request order, a bad item answered in band", async () => {
    async function* items(): AsyncGenerator<ExtractItem> {
      for (let i = 0; i < 12; i++) {
        const fn = i % 5 === 3 ? "nope" : "get_weather";
        yield { function: fn, utterance: `weather ${i} in Lima`, requestId: `s${i}` };
      }
      yield { function: "nope", utterance: "no id given" }; // fails: still gets the server's id
    }
    const results = [];
    for await (const result of client.extractStream(items())) {
      results.push(result);
    }
    assert.deepEqual(
      results.slice(0, 12).map((r) => r.requestId),
      Array.from({ length: 12 }, (_, i) => `s${i}`),
    );
    for (const [i, result] of results.slice(0, 12).entries()) {
      if (i % 5 === 3) {
        assert.equal(result.ok, false);
        assert.equal(result.error?.code, "INVALID_ARGUMENT");
        assert.match(result.error!.message, /unknown function 'nope'/);
      } else {
        assert.equal(result.ok, true);
        checkSpans(result.extraction!, `weather ${i} in Lima`);
      }
    }
    assert.equal(results[12].ok, false);
    assert.equal(results[12].requestId.length, 32);
  });

  it("fails a call that cannot finish before its deadline with DEADLINE_EXCEEDED", async () => {
    const late = client.extract("get_weather", WEATHER, { timeoutMs: 1 });
    await assert.rejects(late, rejectsWith("DEADLINE_EXCEEDED"));
    const short = new ProbeClient(server.target, { timeoutMs: 1 }); // the client's default deadline
    try {
      await assert.rejects(short.extract("get_weather", WEATHER), rejectsWith("DEADLINE_EXCEEDED"));
    } finally {
      short.close();
    }
    assert.equal((await client.extract("get_weather", WEATHER)).slots.length, 2); // the server is fine
  });

  it("cancels a unary call through its AbortSignal", async () => {
    const controller = new AbortController();
    const call = client.extract("get_weather", WEATHER, { signal: controller.signal });
    controller.abort();
    await assert.rejects(call, rejectsWith("CANCELLED"));
  });

  const external = process.env.PROBESERVE_TARGET !== undefined; // no bundle directory to load from
  it("loads, uses and unloads a second bundle through AdminService", { skip: external }, async () => {
    const before = await client.bundles();
    assert.deepEqual(before.bundles.map((b) => [b.name, b.isDefault]), [["tiny", true]]);
    assert.deepEqual(before.engineAdapters, ["tiny"]);
    const loaded = await client.loadBundle(server.bundle, { name: "copy" });
    assert.equal(loaded.bundle.name, "copy");
    assert.equal(loaded.replacedVersion, undefined);
    assert.equal(loaded.bundle.adapterSha256, before.bundles[0].adapterSha256);
    const fromCopy = await client.extract("get_weather", WEATHER, { bundle: "copy" });
    const fromDefault = await client.extract("get_weather", WEATHER);
    assert.deepEqual(fromCopy.values(), fromDefault.values()); // the same adapter and heads
    const again = client.loadBundle(server.bundle, { name: "copy" });
    await assert.rejects(again, rejectsWith("ALREADY_EXISTS", "copy"));
    const unloaded = await client.unloadBundle("copy");
    assert.equal(unloaded.bundle.name, "copy");
    const gone = client.extract("get_weather", WEATHER, { bundle: "copy" });
    await assert.rejects(gone, rejectsWith("NOT_FOUND", "copy"));
    assert.deepEqual((await client.bundles()).engineAdapters, ["tiny"]);
  });

  it("ends a stream cancelled midway without an error", async () => {
    let sent = 0;
    async function* endless(): AsyncGenerator<ExtractItem> {
      for (let i = 0; i < 10_000; i++) {
        sent++;
        yield { function: "get_weather", utterance: `rain ${i} in Oslo`, requestId: String(i) };
      }
    }
    const stream = client.extractStream(endless(), { timeoutMs: 120_000 });
    const got: string[] = [];
    for await (const result of stream) {
      got.push(result.requestId);
      if (got.length === 3) {
        stream.cancel();
      }
    }
    assert.deepEqual(got.slice(0, 3), ["0", "1", "2"]);
    assert.ok(sent < 10_000, `the client kept sending after cancel (${sent})`);
    assert.equal((await client.extract("get_weather", WEATHER)).requestId.length, 32);
  });
});
