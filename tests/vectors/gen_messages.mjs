// Generates tests/vectors/channel_messages.json with @ton/core 0.63.1 + @ton/crypto 3.3.0,
// following tonweb 0.0.66's PaymentUtils.js layouts and its decimal op constants:
//   npm install @ton/core@0.63.1 @ton/crypto@3.3.0 && node gen_messages.mjs > channel_messages.json
import { beginCell } from "@ton/core";
import { keyPairFromSeed, sign } from "@ton/crypto";

const op = {
  top_up: 1741148801, init: 235282626, close: 1433884798, commit: 2040604399,
  start_uncoop: 521476815, challenge: 143567410, finish: 625158801,
};
const tag = { init: 0x696e6974, close: 0x436c6f73, commit: 0x43436d74, uncoop: 0x556e436c, challenge: 0x43686751, state: 0x43685374 };
const A = keyPairFromSeed(Buffer.alloc(32, 1));
const B = keyPairFromSeed(Buffer.alloc(32, 2));
const CH = 0xc0c0an;
const sig = (cell, kp) => sign(cell.hash(), kp.secretKey);
const one = (o, isA, s, body) => beginCell().storeUint(o, 32).storeBit(isA).storeBuffer(s).storeSlice(body.beginParse()).endCell();
const two = (o, sa, sb, body) => beginCell().storeUint(o, 32)
  .storeRef(beginCell().storeBuffer(sa).endCell()).storeRef(beginCell().storeBuffer(sb).endCell())
  .storeSlice(body.beginParse()).endCell();
const semi = (seqno, sent) => beginCell().storeUint(seqno, 64).storeCoins(sent).storeBit(0);
const signedState = (kp, seqno, sent, cp) => {
  const st = beginCell().storeUint(tag.state, 32).storeUint(CH, 128).storeBuilder(semi(seqno, sent))
    .storeMaybeRef(cp ? semi(cp[0], cp[1]).endCell() : null).endCell();
  return beginCell().storeBuffer(sig(st, kp)).storeSlice(st.beginParse()).endCell();
};

const out = {};
out.top_up = beginCell().storeUint(op.top_up, 32).storeCoins(1_000_000_000n).storeCoins(5n).endCell();
const initBody = beginCell().storeUint(tag.init, 32).storeUint(CH, 128).storeCoins(2_000_000_000n).storeCoins(0n).endCell();
out.init_channel_by_a = one(op.init, true, sig(initBody, A), initBody);
const closeBody = beginCell().storeUint(tag.close, 32).storeUint(CH, 128).storeCoins(1_500_000_000n)
  .storeCoins(500_000_000n).storeUint(42n, 64).storeUint(0n, 64).endCell();
out.cooperative_close = two(op.close, sig(closeBody, A), sig(closeBody, B), closeBody);
const commitBody = beginCell().storeUint(tag.commit, 32).storeUint(CH, 128).storeUint(42n, 64).storeUint(3n, 64).endCell();
out.cooperative_commit = two(op.commit, sig(commitBody, A), sig(commitBody, B), commitBody);
const sa = signedState(A, 42n, 500_000_000n, [3n, 0n]);
const sb = signedState(B, 3n, 0n, [42n, 500_000_000n]);
const uncoop = beginCell().storeUint(tag.uncoop, 32).storeUint(CH, 128).storeRef(sa).storeRef(sb).endCell();
out.start_uncooperative_close_by_b = one(op.start_uncoop, false, sig(uncoop, B), uncoop);
const chal = beginCell().storeUint(tag.challenge, 32).storeUint(CH, 128).storeRef(sa).storeRef(sb).endCell();
out.challenge_by_a = one(op.challenge, true, sig(chal, A), chal);
out.finish_uncooperative_close = beginCell().storeUint(op.finish, 32).endCell();

const json = { comment: "payment-channel message bodies from @ton/core 0.63.1 (gen_messages.mjs); keys: seeds 1 (A), 2 (B)" };
for (const [k, c] of Object.entries(out)) json[k] = { hash: c.hash().toString("hex"), boc: c.toBoc().toString("hex") };
console.log(JSON.stringify(json, null, 1));
