// cocoon local chain: @ton/sandbox behind a subset of the toncenter v2 HTTP API, on 127.0.0.1.
//   node server.mjs [--port N]      prints "listening http://127.0.0.1:N" when ready
// toncenter v2: POST /api/v2/sendBoc {boc}, POST /api/v2/runGetMethod {address, method, stack},
//               GET /api/v2/getAddressInformation?address=, GET /api/v2/getTransactions?address=&limit=
// Test-only extras: POST /cocoon/fund {address, amount} (a faucet), POST /cocoon/advance {seconds}
// (moves the chain clock, for quarantine timeouts), GET /cocoon/now.
import http from "node:http";
import { Blockchain } from "@ton/sandbox";
import { Address, Cell, toNano, beginCell } from "@ton/core";

const port = Number(process.argv[process.argv.indexOf("--port") + 1] || 0) || 0;
const chain = await Blockchain.create();
let offset = 0;
const now = () => Math.floor(Date.now() / 1000) + offset;
const faucet = await chain.treasury("cocoon-faucet", { balance: toNano("1000000") });
const txs = new Map(); // address (raw) -> transactions, newest first

function record(result) {
  for (const tx of result.transactions) {
    const addr = new Address(0, Buffer.from(tx.address.toString(16).padStart(64, "0"), "hex")).toRawString();
    const inMsg = tx.inMessage;
    const row = {
      utime: tx.now,
      transaction_id: { lt: tx.lt.toString(), hash: tx.hash().toString("hex") },
      fee: tx.totalFees.coins.toString(),
      aborted: tx.description.type === "generic" ? tx.description.aborted : false,
      exit_code: tx.description.type === "generic" && tx.description.computePhase.type === "vm"
        ? tx.description.computePhase.exitCode : null,
      in_msg: inMsg ? {
        source: inMsg.info.src && inMsg.info.type === "internal" ? inMsg.info.src.toRawString() : "",
        destination: inMsg.info.dest ? inMsg.info.dest.toString() : "",
        value: inMsg.info.type === "internal" ? inMsg.info.value.coins.toString() : "0",
      } : null,
      out_msgs: [...tx.outMessages.values()].map((m) => ({
        destination: m.info.dest ? m.info.dest.toString() : "",
        value: m.info.type === "internal" ? m.info.value.coins.toString() : "0",
      })),
    };
    if (!txs.has(addr)) txs.set(addr, []);
    txs.get(addr).unshift(row);
  }
}

// Stack entries as toncenter v2 writes them: top level ["num", "0x.."] / ["cell", {bytes}] /
// ["tuple", {elements}], and inside tuples the tvm.stackEntry* objects.
function entry(it) {
  if (it.type === "int") return { "@type": "tvm.stackEntryNumber", number: { "@type": "tvm.numberDecimal", number: it.value.toString() } };
  if (it.type === "cell") return { "@type": "tvm.stackEntryCell", cell: { "@type": "tvm.cell", bytes: it.cell.toBoc().toString("base64") } };
  if (it.type === "slice") return { "@type": "tvm.stackEntrySlice", slice: { "@type": "tvm.slice", bytes: it.cell.toBoc().toString("base64") } };
  if (it.type === "tuple") return { "@type": "tvm.stackEntryTuple", tuple: { "@type": "tvm.tuple", elements: it.items.map(entry) } };
  return { "@type": "tvm.stackEntryUnsupported" };
}

function stackOut(items) {
  return items.map((it) => {
    if (it.type === "int") return ["num", "0x" + it.value.toString(16)];
    if (it.type === "cell" || it.type === "slice") return ["cell", { bytes: it.cell.toBoc().toString("base64") }];
    if (it.type === "tuple") return ["tuple", { "@type": "tvm.tuple", elements: it.items.map(entry) }];
    if (it.type === "null") return ["null", null];
    return [it.type, null];
  });
}

async function handle(method, path, query, body) {
  chain.now = now();
  if (path === "/api/v2/sendBoc") {
    const result = await chain.sendMessage(Cell.fromBase64(body.boc));
    record(result);
    return { "@type": "ok" };
  }
  if (path === "/api/v2/runGetMethod") {
    const stack = (body.stack || []).map(([t, v]) => ({ type: "int", value: BigInt(v) }));
    const res = await chain.runGetMethod(Address.parse(body.address), body.method, stack);
    return { exit_code: res.exitCode, gas_used: Number(res.gasUsed), stack: stackOut(res.stack) };
  }
  if (path === "/api/v2/getAddressInformation") {
    const c = await chain.getContract(Address.parse(query.get("address")));
    const st = c.accountState;
    const state = !st ? "uninitialized" : st.type === "active" ? "active" : st.type === "frozen" ? "frozen" : "uninitialized";
    return { balance: c.balance.toString(), state };
  }
  if (path === "/api/v2/getTransactions") {
    const addr = Address.parse(query.get("address")).toRawString();
    return (txs.get(addr) || []).slice(0, Number(query.get("limit") || 10));
  }
  if (path === "/cocoon/fund") {
    const result = await faucet.send({ to: Address.parse(body.address), value: BigInt(body.amount), bounce: false,
      body: beginCell().endCell() });
    record(result);
    return { "@type": "ok" };
  }
  if (path === "/cocoon/advance") { offset += Number(body.seconds); return { now: now() }; }
  if (path === "/cocoon/now") return { now: now() };
  throw Object.assign(new Error(`no such method ${method} ${path}`), { status: 404 });
}

const server = http.createServer((req, res) => {
  let data = "";
  req.on("data", (c) => { data += c; if (data.length > 1 << 20) req.destroy(); });
  req.on("end", async () => {
    const url = new URL(req.url, "http://127.0.0.1");
    let status = 200, payload;
    try {
      payload = { ok: true, result: await handle(req.method, url.pathname, url.searchParams, data ? JSON.parse(data) : {}) };
    } catch (e) {
      status = e.status || 500;
      payload = { ok: false, error: String(e.message || e), code: status };
    }
    res.writeHead(status, { "content-type": "application/json" });
    res.end(JSON.stringify(payload));
  });
});
server.listen(port, "127.0.0.1", () => console.log(`listening http://127.0.0.1:${server.address().port}`));
process.stdin.on("end", () => process.exit(0)); // stops with its parent
process.stdin.resume();
