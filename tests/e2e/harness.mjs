// Shared pieces of the browser tests: start balie-sfu, sign tokens, launch
// headless Chromium with a fake camera and microphone.

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
export const SFU = process.env.BALIE_SFU ?? join(here, '../../target/debug/balie-sfu');
export const SECRET = 'balie-e2e-secret';

/** Start balie-sfu with a config of our own; resolves when it serves. */
export async function startSfu(extraRooms = '') {
  const dir = mkdtempSync(join(tmpdir(), 'balie-e2e-'));
  const config = join(dir, 'sfu.toml');
  writeFileSync(config, [
    'dev = true',
    'http = "127.0.0.1:0"',
    '[media]', 'udp_bind = "127.0.0.1"', 'shards = 1',
    '[rooms]', extraRooms,
    '[auth]', `hs256_secret = "${SECRET}"`,
    '[drain]', 'timeout = "1s"',
  ].join('\n'));
  const proc = spawn(SFU, ['--config', config], { stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  proc.stderr.on('data', (d) => { log += d; });
  const url = await new Promise((resolve, reject) => {
    let out = '';
    proc.stdout.on('data', (d) => {
      out += d;
      const m = /serving on (http:\/\/\S+)/.exec(out);
      if (m) resolve(m[1]);
    });
    proc.on('exit', (code) => reject(new Error(`balie-sfu exited ${code}: ${log}`)));
    setTimeout(() => reject(new Error('balie-sfu did not start')), 20000);
  });
  return {
    url,
    log: () => log,
    /** Freeze the server (SIGSTOP), as if the network were gone. */
    pause() { proc.kill('SIGSTOP'); },
    resume() { proc.kill('SIGCONT'); },
    async stop() {
      proc.kill('SIGTERM');
      await new Promise((r) => proc.on('exit', r));
    },
  };
}

const b64 = (x) => Buffer.from(typeof x === 'string' ? x : JSON.stringify(x)).toString('base64url');

/** An HS256 token as the municipality's portal would issue it. */
export function token(claims) {
  const body = { exp: Math.floor(Date.now() / 1000) + 3600, ...claims };
  const unsigned = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(body)}`;
  const sig = createHmac('sha256', SECRET).update(unsigned).digest('base64url');
  return `${unsigned}.${sig}`;
}

export async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: [
      '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-quic',
      '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
      '--allow-loopback-in-peer-connection', '--autoplay-policy=no-user-gesture-required',
    ],
  });
}

/** A page of its own (separate storage) at a given viewport. */
export async function newPage(browser, viewport = { width: 1280, height: 800 }) {
  const context = await browser.newContext({ viewport });
  return context.newPage();
}

/** Inbound media counters of the page's peer connection. */
export async function inbound(page) {
  return page.evaluate(async () => {
    const pc = window.balie?.state?.pc;
    const r = { framesDecoded: 0, audioPackets: 0, frameWidth: 0 };
    if (!pc) return r;
    (await pc.getStats()).forEach((s) => {
      if (s.type !== 'inbound-rtp') return;
      if (s.kind === 'video') {
        r.framesDecoded += s.framesDecoded ?? 0;
        r.frameWidth = Math.max(r.frameWidth, s.frameWidth ?? 0);
      }
      if (s.kind === 'audio') r.audioPackets += s.packetsReceived ?? 0;
    });
    return r;
  });
}

/** Video bytes the page has sent, all simulcast layers together. */
export async function videoBytesSent(page) {
  return page.evaluate(async () => {
    let bytes = 0;
    (await window.balie.state.pc.getStats()).forEach((s) => {
      if (s.type === 'outbound-rtp' && s.kind === 'video') bytes += s.bytesSent ?? 0;
    });
    return bytes;
  });
}

/** Poll `fn` until it returns truthy, or fail after `ms`. */
export async function until(fn, ms, what) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) {
    last = await fn();
    if (last) return last;
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`timed out: ${what} (last: ${JSON.stringify(last)})`);
}
