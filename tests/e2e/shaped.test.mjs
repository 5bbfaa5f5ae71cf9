// Adaptive simulcast in a real browser on a shaped link: a Chromium publisher
// sends q/h/f (320x180, 640x360, 1280x720); a Chromium subscriber sits behind a
// link whose downlink tc limits, in network namespaces of our own. We time how
// long the subscriber's decoder (`frameWidth` in getStats) takes to show the
// layer its link carries after the link changes.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startSfu, token, launch, newPage, inbound, until, Netns } from './harness.mjs';

const net = new Netns();
let sfu;
let pubBrowser;
let subBrowser;

before(async () => {
  await net.up();
  // Layer decisions are logged at debug level: shown when the test fails.
  process.env.RUST_LOG = 'info,balie_sfu::shard::core=debug,balie_sfu::shard::session=debug';
  sfu = await startSfu('', { netns: net.server, ip: net.serverIp });
  // Camera and microphone need a secure context; plain http on an address
  // other than loopback is one only when the browser is told so.
  const args = [`--unsafely-treat-insecure-origin-as-secure=${sfu.url}`];
  pubBrowser = await launch({ netns: net.server, args });
  subBrowser = await launch({ netns: net.client, args });
});

after(async () => {
  await pubBrowser?.close();
  await subBrowser?.close();
  await sfu?.stop();
  await net.down();
});

const join = (room, sub, role) => token({ room, sub, name: sub, role, loa: 'midden' });

/** Poll the subscriber's decoded width every 100 ms until `ok(width)`; seconds taken. */
async function timeUntil(page, ok, ms, what) {
  const start = Date.now();
  let last;
  while (Date.now() - start < ms) {
    last = await inbound(page);
    if (last.frameWidth > 0 && ok(last.frameWidth)) return (Date.now() - start) / 1000;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out after ${ms} ms: ${what} (last: ${JSON.stringify(last)})`);
}

/** Poll every 100 ms until the decoded width has been `width` for `holdMs`; seconds taken. */
async function heldFor(page, width, holdMs, ms, what) {
  const start = Date.now();
  let since = null;
  let last;
  while (Date.now() - start < ms) {
    last = await inbound(page);
    if (last.frameWidth === width) {
      since ??= Date.now();
      if (Date.now() - since >= holdMs) return (Date.now() - start) / 1000;
    } else {
      since = null;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out after ${ms} ms: ${what} (last: ${JSON.stringify(last)})`);
}

/** The publisher's bitrate per simulcast layer (kbit/s) over 2 s. */
async function layerRates(page) {
  const sample = () => page.evaluate(async () => {
    const r = {};
    (await window.balie.state.pc.getStats()).forEach((s) => {
      if (s.type === 'outbound-rtp' && s.kind === 'video') r[s.rid] = [s.bytesSent, s.frameWidth];
    });
    return r;
  });
  const a = await sample();
  await new Promise((r) => setTimeout(r, 2000));
  const b = await sample();
  return Object.fromEntries(Object.keys(b).map((rid) => [rid, [Math.round(((b[rid][0] - (a[rid]?.[0] ?? 0)) * 8) / 2000), b[rid][1]]]));
}

test('on a shaped downlink the subscriber drops to the low layer fast and climbs back', async () => {
  const room = 'e2e-shaped';
  const pub = await newPage(pubBrowser);
  const subp = await newPage(subBrowser, { width: 1280, height: 800 });
  const events = [];
  try {
    await pub.goto(`${sfu.url}/join?token=${join(room, 'p', 'interpreter')}`);
    await pub.getByRole('button', { name: 'Start het gesprek' }).click();
    await pub.locator('#view-call').waitFor();
    // The subscriber only watches (an observer publishes nothing): one
    // encoder on the machine, so Chromium does not scale f down for lack of CPU.
    await subp.goto(`${sfu.url}/join?token=${join(room, 's', 'observer')}`);
    await subp.getByRole('button', { name: 'Start het gesprek' }).click();
    await subp.locator('#view-call').waitFor();

    // A large window on an open link: the full layer.
    const open = await timeUntil(subp, (w) => w >= 1280, 30000, 'the full layer on an open link');
    const rates = await layerRates(pub);
    console.log(`publisher layers (kbit/s): ${JSON.stringify(rates)}`);
    const down = [];
    const up = [];
    const mark = (what) => events.push(`${what} ${new Date().toISOString()}`);
    for (let round = 0; round < 3; round += 1) {
      // 6 s on f first: a drop within 5 s of a step up counts as a failed
      // step and backs off (ARCHITECTURE.md), which is right on a real link
      // but would make each round here wait longer than the last.
      await new Promise((r) => setTimeout(r, 6000));
      const before = await inbound(subp);
      await net.shape(300);
      mark('cap 300');
      const t = await timeUntil(subp, (w) => w <= 320, 10000, 'the low layer under a 300 kbit/s cap');
      down.push(t);
      // What the subscriber's decoder went through meanwhile (printed with
      // the link changes when the test fails).
      const after = await inbound(subp);
      const delta = Object.fromEntries(Object.keys(after).map((k) => [k, after[k] - before[k]]));
      mark(`q after ${t} s ${JSON.stringify(delta)}`);
      // Checked at once: the log printed on failure then ends at this round.
      assert.ok(t <= 5, `q within 5 s of the cap (took ${t} s; the subscriber meanwhile: ${JSON.stringify(delta)})`);
      await new Promise((r) => setTimeout(r, 5000));
      await net.shape(null);
      mark('lift');
      up.push(await timeUntil(subp, (w) => w >= 1280, 30000, 'the full layer once the cap is lifted'));
    }
    // A cap between what h and f need. The 900 kbit/s assumes f at
    // about 1.5 Mbit/s; Chromium sends the fake camera's f at 0.7-1.2 Mbit/s,
    // and its rate drifts, so the cap is taken from the rates measured just
    // before it: halfway between the smallest link on which the SFU takes h
    // and what f needs with audio. A layer is taken when it fits the
    // estimate less audio (48 kbit/s) with 15% headroom (shard/layers.rs),
    // and the estimate settles at about 85% of the link: h needs a link of
    // (1.15 h + 48) / 0.85. (From the rates at the start, the cap once sat
    // at 891 kbit/s for an f measured at 1,090 and f, drifted to about 735,
    // fitted under it without loss for 30 s; 10% above h's need left h
    // reached only after 20.9 s in one run.)
    // 6 s on f before this cap too (4 s here, 2 s measuring the rates):
    // a cap 2 s after the step up to f counts as a failed step and the way
    // to h then waits out a backoff (4-16 s after earlier failed steps).
    await new Promise((r) => setTimeout(r, 4000));
    const now = await layerRates(pub);
    console.log(`publisher layers before the middle cap (kbit/s): ${JSON.stringify(now)}`);
    const hNeeds = (now.h[0] * 1.15 + 48) / 0.85;
    const midCap = Math.round((hNeeds + now.f[0] + 48) / 2);
    await net.shape(midCap);
    mark(`cap ${midCap}`);
    const mid = await timeUntil(subp, (w) => w === 640, 30000, `the middle layer at ${midCap} kbit/s`);
    // The first h may be the way down from f: the cap cuts f's queue, the
    // loss of that moment can send the subscriber on to q, and it comes
    // back to h a few seconds later (the simulator's tests see the same).
    // The hold is measured from when h has stayed 2 s.
    const settled = await heldFor(subp, 640, 2000, 30000, `h held for 2 s at ${midCap} kbit/s`);
    // Once settled on h, how much of the next 20 s does it stay there?
    let onH = 0;
    let samples = 0;
    const end = Date.now() + 20000;
    while (Date.now() < end) {
      samples += 1;
      if ((await inbound(subp)).frameWidth === 640) onH += 1;
      await new Promise((r) => setTimeout(r, 250));
    }
    console.log(`shaped link: f on the open link after ${open.toFixed(1)} s; `
      + `300 kbit/s -> q shown after ${down.map((t) => t.toFixed(2)).join(', ')} s; `
      + `lifted -> f shown after ${up.map((t) => t.toFixed(1)).join(', ')} s; `
      + `${midCap} kbit/s -> h after ${mid.toFixed(1)} s, held 2 s ${settled.toFixed(1)} s later, `
      + `then on h ${Math.round((100 * onH) / samples)}% of 20 s`);
    // BALIE_E2E_LOG=1 shows the layer decisions of a run that passed too.
    if (process.env.BALIE_E2E_LOG) {
      console.log(`link changes: ${events.join(', ')}`);
      console.log(sfu.log().split('\n').filter((l) => /layer|loss cap|bwe want/.test(l)).join('\n'));
    }
    // Bounds with room for a loaded 2-core CI machine; the figures measured
    // here are in docs/benchmarks.md, the simulator checks the 2 s/10 s.
    // q: the middle of the three rounds within 2.5 s, each within 5 s. In
    // about 60 rounds on this VM (some with two busy loops beside it) q came
    // after 0.9-1.8 s; one round of one CI run took 4.35 s, and its log was
    // not kept (docs/benchmarks.md, 2026-11-30 i).
    const middle = [...down].sort((a, b) => a - b)[1];
    assert.ok(middle <= 2.5, `q within 2.5 s of the cap, the middle of three rounds (took ${down.join(', ')} s)`);
    // f: each round within 25 s of lifting. The way up is two steps, each
    // after a 2 s hold with padding; one overuse the delay detector reads
    // in the padding (CPU contention shows as delay) drops the estimate to
    // 0.85 of the acked rate and starts it again: 18.2 s once in 15 rounds
    // beside a busy loop here, 4.6-12.1 s otherwise (docs/benchmarks.md,
    // 2026-11-30 k). A way back that sticks never gets there (30 s).
    for (const t of up) assert.ok(t <= 25, `f within 25 s of lifting (took ${t} s)`);
    assert.ok(onH / samples >= 0.6, `h holds at ${midCap} kbit/s (${onH}/${samples})`);
  } catch (e) {
    console.log(`now ${new Date().toISOString()}; link changes: ${events.join(', ')}`);
    console.log(sfu.log().split('\n').filter((l) => /layer|loss cap|bwe want/.test(l)).slice(-80).join('\n'));
    throw e;
  } finally {
    await net.shape(null);
    await pub.context().close();
    await subp.context().close();
  }
});
