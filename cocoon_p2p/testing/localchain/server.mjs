// cocoon local chain: @ton/sandbox behind a subset of the toncenter v2 HTTP API, on 127.0.0.1.
//   node server.mjs [--port N] [--block-ms N] [--rate-limit N] [--rate-limit-nokey N] [--fail-rate P] [--seed S]
// prints "listening http://127.0.0.1:N" when ready, and exits when its stdin ends.
//
// Two modes. Synchronous (--block-ms 0, the default, for fast tests): sendBoc applies the message
// and everything it triggers before it returns. Realistic (--block-ms N > 0), like testnet: sendBoc
// checks that the BoC parses and that its account would accept it now (as a liteserver runs the
// external's acceptance against the current state: a bad signature or seqno is an error at once),
// then queues it; every N ms a block applies the queued externals,
// and each internal message a transaction sends waits for the block after its parent's.
// --rate-limit: requests/s per API key (X-API-Key header or api_key query); keyless requests share
// --rate-limit-nokey (default min(1, rate-limit)); 0 = unlimited. --fail-rate: probability of an
// injected 502/503/504, before or after the request did its work (a lost reply). --seed: for that.
//
// toncenter v2: POST /api/v2/sendBoc {boc}, POST /api/v2/runGetMethod {address, method, stack},
//   GET /api/v2/getAddressInformation?address=, GET /api/v2/getTransactions?address=&limit=&lt=&hash=&to_lt=
//   Answers are shaped as toncenter's (ton-http-api over tonlib): {ok, result} or {ok: false, error, code}.
// Test-only extras, never limited nor failed: POST /cocoon/fund {address, amount} (a faucet),
//   POST /cocoon/advance {seconds} (moves the chain clock), GET /cocoon/now, GET /cocoon/status,
//   POST /cocoon/settle {timeout_s} (answers once every queued message is applied),
//   POST /cocoon/block {count} (produces blocks now, for tests that step by hand).
import http from "node:http";
import { createHash } from "node:crypto";
import { Blockchain, GetMethodError } from "@ton/sandbox";
import { Address, Cell, beginCell, external, internal, loadMessage, storeStateInit, toNano } from "@ton/core";

const arg = (name, fallback) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? Number(process.argv[i + 1]) : fallback;
};
const opts = { port: arg("--port", 0), blockMs: arg("--block-ms", 0), rateLimit: arg("--rate-limit", 0),
  failRate: arg("--fail-rate", 0), seed: arg("--seed", 0) };
opts.rateLimitNokey = arg("--rate-limit-nokey", opts.rateLimit > 0 ? Math.min(1, opts.rateLimit) : 0);
const realistic = opts.blockMs > 0;

const chain = await Blockchain.create();
let offset = 0;
const now = () => Math.floor(Date.now() / 1000) + offset;
const faucet = await chain.treasury("cocoon-faucet", { balance: toNano("1000000") });
const txs = new Map(); // account (raw) -> its transactions, oldest first
let block = 1; // the seqno the next block gets
let pending = []; // realistic mode: messages the next block applies, in order
let dropped = 0; // externals no account accepted (a validator drops them, as here)
let producing = Promise.resolve(); // one block at a time, timer or /cocoon/block
let inBlock = false;
let settleWaiters = [];

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// mulberry32: a seeded generator, so a failing run can be replayed with its --seed.
let rngState = opts.seed >>> 0;
const rng = () => {
  rngState = (rngState + 0x6d2b79f5) >>> 0;
  let t = rngState;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
};

function record(tx) {
  const addr = new Address(0, Buffer.from(tx.address.toString(16).padStart(64, "0"), "hex")).toRawString();
  if (!txs.has(addr)) txs.set(addr, []);
  txs.get(addr).push(tx);
}

// ---- blocks ----

async function applyNow(msg) {
  chain.now = now();
  const result = await chain.sendMessage(msg);
  block += 1;
  result.transactions.forEach(record);
}

async function produceBlock() {
  const due = pending;
  pending = [];
  inBlock = true;
  chain.now = now();
  try {
    for (const msg of due) {
      let step;
      try {
        // One transaction per message: its children go to the next block, not through sandbox's queue.
        step = await (await chain.sendMessageIter(msg, { allowParallel: true })).next();
      } catch {
        dropped += 1; // an external the account did not accept
        continue;
      }
      if (step.done) continue;
      record(step.value);
      for (const out of step.value.outMessages.values()) if (out.info.type === "internal") pending.push(out);
    }
  } finally {
    block += 1;
    inBlock = false;
    if (pending.length === 0) { settleWaiters.forEach((wake) => wake(true)); settleWaiters = []; }
  }
}

const nextBlock = () => (producing = producing.then(produceBlock, produceBlock));
if (realistic) setInterval(() => { if (!inBlock) nextBlock().catch((e) => console.error("block failed:", e)); }, opts.blockMs);

function settle(timeoutS) {
  if (!realistic || (pending.length === 0 && !inBlock)) return Promise.resolve(true);
  return new Promise((wake) => {
    settleWaiters.push(wake);
    setTimeout(() => wake(false), timeoutS * 1000);
  });
}

// ---- toncenter v2 shapes (tonlib's objects as ton-http-api renders them) ----

const b64 = (cell) => cell.toBoc({ idx: false, crc32: false }).toString("base64");
// Addresses in messages: user-friendly, bounceable, url-safe, as tonlib writes them; "" for external ones.
const friendly = (addr) => (Address.isAddress(addr) ? addr.toString({ urlSafe: true, bounceable: true }) : "");
const txId = (lt, hash) => ({ "@type": "internal.transactionId", lt: lt.toString(), hash: hash.toString("base64") });
const fakeHash = (what) => createHash("sha256").update(what).digest().toString("base64");
const blockId = () => ({ "@type": "ton.blockIdExt", workchain: -1, shard: "-9223372036854775808", seqno: block,
  root_hash: fakeHash(`root ${block}`), file_hash: fakeHash(`file ${block}`) });

function cellBytes(cell) {
  const out = Buffer.alloc(Math.ceil(cell.bits.length / 8));
  for (let i = 0; i < cell.bits.length; i++) if (cell.bits.at(i)) out[i >> 3] |= 0x80 >> (i & 7);
  return out;
}
// tvm_valuetypes' Cell.serialize_to_object, which toncenter sends beside a cell's BoC.
const cellObject = (cell) => ({ data: { b64: cellBytes(cell).toString("base64"), len: cell.bits.length },
  refs: cell.refs.map(cellObject) });
// Python's base64.encodebytes (pytonlib decodes message bodies so): 76-character lines, each ending "\n".
const mimeBase64 = (buf) => (buf.toString("base64").match(/.{1,76}/g) || []).map((l) => l + "\n").join("");

function msgData(body, init) {
  // tonlib: a body opening with op 0 (1) that holds a snake string is a text (an encrypted) comment.
  if (body.bits.length >= 32) {
    try {
      const s = body.beginParse();
      const op = s.loadUint(32);
      if (op <= 1 && s.remainingBits % 8 === 0) {
        const text = s.loadBuffer(s.remainingBits / 8);
        const tail = s.remainingRefs ? s.loadRef().beginParse().loadStringTail() : "";
        const bytes = Buffer.concat([text, Buffer.from(tail)]);
        if (op === 1) return [{ "@type": "msg.dataEncryptedText", text: bytes.toString("base64") }, undefined];
        return [{ "@type": "msg.dataText", text: bytes.toString("base64") }, bytes.toString()];
      }
    } catch { /* not a snake string: raw */ }
  }
  const initState = init ? b64(beginCell().store(storeStateInit(init)).endCell()) : "";
  return [{ "@type": "msg.dataRaw", body: b64(body), init_state: initState }, mimeBase64(cellBytes(body))];
}

function msgRow(m) {
  const info = m.info;
  const int = info.type === "internal";
  const [data, message] = msgData(m.body, m.init);
  return { "@type": "raw.message", source: info.type === "external-in" ? "" : friendly(info.src),
    destination: info.type === "external-out" ? "" : friendly(info.dest),
    value: int ? info.value.coins.toString() : "0", fwd_fee: int ? info.forwardFee.toString() : "0",
    ihr_fee: int ? info.ihrFee.toString() : "0", created_lt: int ? info.createdLt.toString() : "0",
    body_hash: m.body.hash().toString("base64"), msg_data: data, message };
}

function txRow(tx, account) {
  const outs = [...tx.outMessages.values()];
  // tonlib's "fee": the total fees plus what the out messages paid to be forwarded.
  const fee = outs.reduce((sum, m) => sum + (m.info.type === "internal" ? m.info.forwardFee + m.info.ihrFee : 0n), tx.totalFees.coins);
  const storage = tx.description.storagePhase?.storageFeesCollected ?? 0n;
  const empty = { info: { type: "external-in", dest: null }, body: beginCell().endCell() };
  return { "@type": "raw.transaction", address: { "@type": "accountAddress", account_address: account },
    utime: tx.now, data: b64(tx.raw), transaction_id: txId(tx.lt, tx.hash()),
    fee: fee.toString(), storage_fee: storage.toString(), other_fee: (fee - storage).toString(),
    in_msg: msgRow(tx.inMessage ?? empty), out_msgs: outs.map(msgRow) };
}

// tonlib turns a null, and a pair whose tail is a list, into a tvm.list; slices into cells.
function isList(it) {
  while (it.type === "tuple") {
    if (it.items.length !== 2) return false;
    it = it.items[1];
  }
  return it.type === "null";
}
function flatten(it) {
  const out = [];
  for (; it.type === "tuple"; it = it.items[1]) out.push(it.items[0]);
  return out;
}
function stackEntry(it) {
  if (it.type === "int") return { "@type": "tvm.stackEntryNumber", number: { "@type": "tvm.numberDecimal", number: it.value.toString() } };
  if (it.type === "cell" || it.type === "slice") return { "@type": "tvm.stackEntryCell", cell: { "@type": "tvm.cell", bytes: b64(it.cell) } };
  if (isList(it)) return { "@type": "tvm.stackEntryList", list: { "@type": "tvm.list", elements: flatten(it).map(stackEntry) } };
  if (it.type === "tuple") return { "@type": "tvm.stackEntryTuple", tuple: { "@type": "tvm.tuple", elements: it.items.map(stackEntry) } };
  return { "@type": "tvm.stackEntryUnsupported" };
}
// Top level as ton-http-api writes it: ["num", hex], ["cell", {bytes, object}], ["tuple"|"list", {...}].
function stackOut(it) {
  if (it.type === "int") return ["num", (it.value < 0n ? "-0x" + (-it.value).toString(16) : "0x" + it.value.toString(16))];
  if (it.type === "cell" || it.type === "slice") return ["cell", { bytes: b64(it.cell), object: cellObject(it.cell) }];
  if (isList(it)) return ["list", { "@type": "tvm.list", elements: flatten(it).map(stackEntry) }];
  if (it.type === "tuple") return ["tuple", { "@type": "tvm.tuple", elements: it.items.map(stackEntry) }];
  return ["unsupported", {}];
}

function parseInt257(v) {
  const s = String(v).trim();
  const neg = s.startsWith("-");
  const n = BigInt(neg ? s.slice(1) : s); // takes "123" and "0x7b"
  return neg ? -n : n;
}
function stackIn(entries) {
  if (!Array.isArray(entries)) throw new ApiError(422, "Validation error: stack must be a list");
  return entries.map((e) => {
    const [kind, value] = Array.isArray(e) && e.length === 2 ? e : [];
    try {
      if (["num", "number", "int"].includes(kind)) return { type: "int", value: parseInt257(value) };
      if (kind === "tvm.Cell") return { type: "cell", cell: Cell.fromBase64(value) };
      if (kind === "tvm.Slice") return { type: "slice", cell: Cell.fromBase64(value) };
    } catch { /* falls through */ }
    throw new ApiError(422, `Validation error: bad stack entry ${JSON.stringify(e)}`);
  });
}

function parseAddress(text) {
  if (!text) throw new ApiError(422, "Validation error: address is required");
  try { return Address.parse(text); } catch { throw new ApiError(416, "Incorrect address"); }
}

// ---- methods ----

async function accountInfo(address) {
  const c = await chain.getContract(address);
  const st = c.accountState;
  const exists = c.lastTransactionLt > 0n; // sandbox makes every unknown account an empty uninit one
  const active = st?.type === "active";
  const info = { "@type": "raw.fullAccountState",
    balance: exists ? c.balance.toString() : 0, // tonlib's -1 for "no account", which ton-http-api turns into 0
    code: active && st.state.code ? b64(st.state.code) : "", data: active && st.state.data ? b64(st.state.data) : "",
    last_transaction_id: txId(c.lastTransactionLt, Buffer.from(c.lastTransactionHash.toString(16).padStart(64, "0"), "hex")),
    block_id: blockId(), frozen_hash: st?.type === "frozen" ? Buffer.from(st.stateHash.toString(16).padStart(64, "0"), "hex").toString("base64") : "",
    sync_utime: now() };
  info.state = info.code ? "active" : info.frozen_hash ? "frozen" : "uninitialized";
  return info;
}

async function runGetMethod(body) {
  const address = parseAddress(body.address);
  if (body.method === undefined || body.method === null) throw new ApiError(422, "Validation error: method is required");
  const stack = stackIn(body.stack ?? []);
  const info = await accountInfo(address);
  const result = { "@type": "smc.runResult", gas_used: 0, stack: [], exit_code: -13, block_id: info.block_id,
    last_transaction_id: info.last_transaction_id };
  if (info.state !== "active") return result; // tonlib runs no code there
  try {
    const res = await chain.runGetMethod(address, body.method, stack);
    Object.assign(result, { gas_used: Number(res.gasUsed), stack: res.stack.map(stackOut), exit_code: res.exitCode });
  } catch (e) {
    if (!(e instanceof GetMethodError)) throw e;
    Object.assign(result, { gas_used: Number(e.gasUsed), exit_code: e.exitCode });
  }
  return result;
}

function getTransactions(query) {
  const account = parseAddress(query.get("address"));
  const limit = Number(query.get("limit") ?? 10);
  if (!Number.isInteger(limit) || limit < 1 || limit > 100) throw new ApiError(422, "Validation error: limit must be 1..100");
  let rows = [...(txs.get(account.toRawString()) || [])].reverse(); // newest first
  if (query.get("lt")) {
    const lt = BigInt(query.get("lt"));
    const hash = query.get("hash") || "";
    const start = rows.findIndex((tx) => tx.lt === lt && (!hash || [tx.hash().toString("hex"),
      tx.hash().toString("base64")].includes(hash.replace(/-/g, "+").replace(/_/g, "/"))));
    if (start < 0) throw new ApiError(500, "LITE_SERVER_UNKNOWN: transaction not found");
    rows = rows.slice(start);
  }
  const toLt = BigInt(query.get("to_lt") || 0);
  rows = rows.filter((tx) => tx.lt > toLt).slice(0, limit);
  return rows.map((tx) => txRow(tx, friendly(account)));
}

async function sendBoc(body) {
  if (typeof body.boc !== "string") throw new ApiError(422, "Validation error: boc is required");
  let msg;
  try {
    msg = loadMessage(Cell.fromBase64(body.boc).beginParse());
  } catch (e) {
    throw new ApiError(400, `Failed to deserialize boc: ${e.message}`);
  }
  if (msg.info.type !== "external-in") throw new ApiError(400, "Message is not an inbound external message");
  if (realistic) {
    await (producing = producing.then(() => checkAccepted(msg), () => checkAccepted(msg)));
    pending.push(msg);
  } else {
    try { await applyNow(msg); } catch (e) {
      throw new ApiError(500, `LITE_SERVER_UNKNOWN: cannot apply external message to current state : ${e.message}`);
    }
  }
  return { "@type": "ok" };
}

// The acceptance check runs the message on a snapshot and puts the chain back, between blocks.
async function checkAccepted(msg) {
  const before = chain.snapshot();
  chain.now = now();
  try {
    await (await chain.sendMessageIter(msg, { allowParallel: true })).next();
  } catch (e) {
    throw new ApiError(500, `LITE_SERVER_UNKNOWN: cannot apply external message to current state : External message was not accepted (${e.message})`);
  } finally {
    await chain.loadFrom(before);
  }
}

async function fund(body) {
  const to = parseAddress(body.address);
  const gift = internal({ to, value: BigInt(body.amount), bounce: false, body: beginCell().endCell() });
  if (!realistic) {
    chain.now = now();
    (await faucet.send({ to, value: BigInt(body.amount), bounce: false, body: beginCell().endCell() })).transactions.forEach(record);
  } else pending.push(external({ to: faucet.address, body: faucet.createTransfer({ messages: [gift] }) }));
  return { "@type": "ok" };
}

const status = () => ({ realistic, block, pending: pending.length, dropped, now: now() });
const routes = {
  "POST /api/v2/sendBoc": (q, b) => sendBoc(b),
  "POST /api/v2/runGetMethod": (q, b) => runGetMethod(b),
  "GET /api/v2/getAddressInformation": (q) => accountInfo(parseAddress(q.get("address"))),
  "GET /api/v2/getTransactions": (q) => getTransactions(q),
  "POST /cocoon/fund": (q, b) => fund(b),
  "POST /cocoon/advance": (q, b) => { offset += Number(b.seconds); return { now: now() }; },
  "GET /cocoon/now": () => ({ now: now() }),
  "GET /cocoon/status": status,
  "POST /cocoon/settle": async (q, b) => ({ settled: await settle(Number(b.timeout_s ?? 60)), ...status() }),
  "POST /cocoon/block": async (q, b) => {
    for (let i = 0; i < Number(b.count ?? 1); i++) await nextBlock();
    return status();
  },
};

// ---- limits and failures (toncenter's, for /api/v2 only) ----

const buckets = new Map(); // API key ("" for none) -> {tokens, at}: a token bucket of one second's requests
function admit(key) {
  const rate = key ? opts.rateLimit : opts.rateLimitNokey;
  if (!rate) return true;
  const t = Date.now() / 1000;
  const b = buckets.get(key) ?? { tokens: Math.max(1, rate), at: t };
  b.tokens = Math.min(Math.max(1, rate), b.tokens + (t - b.at) * rate);
  b.at = t;
  buckets.set(key, b);
  if (b.tokens < 1) return false;
  b.tokens -= 1;
  return true;
}
const FAILURES = { 502: "Bad Gateway", 503: "Service Unavailable", 504: "Liteserver timeout" };

async function serve(req, data) {
  const url = new URL(req.url, "http://127.0.0.1");
  const route = routes[`${req.method} ${url.pathname}`];
  if (!route) {
    const known = Object.keys(routes).some((r) => r.endsWith(` ${url.pathname}`));
    throw new ApiError(known ? 405 : 404, known ? "Method Not Allowed" : "Not Found");
  }
  chain.now = now(); // get methods read the clock too
  let body;
  try { body = data ? JSON.parse(data) : {}; } catch { throw new ApiError(422, "Validation error: body is not JSON"); }
  if (!url.pathname.startsWith("/api/v2/")) return route(url.searchParams, body);
  if (!admit(req.headers["x-api-key"] || url.searchParams.get("api_key") || "")) throw new ApiError(429, "Ratelimit exceed");
  const failure = opts.failRate > 0 && rng() < opts.failRate ? [502, 503, 504][Math.floor(rng() * 3)] : 0;
  const lostReply = failure && rng() < 0.5; // the work was done, only the answer is lost
  if (failure && !lostReply) throw new ApiError(failure, FAILURES[failure]);
  const result = await route(url.searchParams, body);
  if (failure) throw new ApiError(failure, FAILURES[failure]);
  return result;
}

const server = http.createServer((req, res) => {
  let data = "";
  req.on("data", (c) => { data += c; if (data.length > 1 << 20) req.destroy(); });
  req.on("end", async () => {
    let status = 200, payload;
    try {
      payload = { ok: true, result: await serve(req, data) };
    } catch (e) {
      status = e instanceof ApiError ? e.status : 500;
      payload = { ok: false, error: String(e.message || e), code: status };
    }
    res.writeHead(status, { "content-type": "application/json" });
    res.end(JSON.stringify(payload));
  });
});
// --host: where to listen (127.0.0.1; the NAT lab gives its public host's address).
const hostIndex = process.argv.indexOf("--host");
const listenHost = hostIndex > 0 ? process.argv[hostIndex + 1] : "127.0.0.1";
server.listen(opts.port, listenHost, () => console.log(`listening http://${listenHost}:${server.address().port}`));
process.stdin.on("end", () => process.exit(0)); // stops with its parent
process.stdin.resume();
