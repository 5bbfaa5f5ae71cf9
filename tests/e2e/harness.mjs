// Shared pieces of the browser tests: start balie-sfu, sign tokens, launch
// headless Chromium with a fake camera and microphone.

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
export const SFU = process.env.BALIE_SFU ?? join(here, '../../target/debug/balie-sfu');
export const SECRET = 'balie-e2e-secret';

/**
 * Start balie-sfu with a config of our own; resolves when it serves.
 * `net.netns`/`net.ip`: run it inside that network namespace, bound to that
 * address (see `Netns`), instead of on 127.0.0.1.
 */
export async function startSfu(extraRooms = '', net = {}, extra = '') {
  const dir = mkdtempSync(join(tmpdir(), 'balie-e2e-'));
  const config = join(dir, 'sfu.toml');
  const ip = net.ip ?? '127.0.0.1';
  writeFileSync(config, [
    'dev = true',
    `http = "${ip}:0"`,
    '[media]', `udp_bind = "${ip}"`, 'shards = 1',
    '[rooms]', extraRooms,
    '[auth]', `hs256_secret = "${SECRET}"`,
    '[drain]', 'timeout = "1s"',
    extra,
  ].join('\n'));
  const [cmd, args] = net.netns
    ? ['ip', ['netns', 'exec', net.netns, SFU, '--config', config]]
    : [SFU, ['--config', config]];
  const proc = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
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
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

export const TRANSCODER = process.env.BALIE_TRANSCODER ?? join(here, '../../target/debug/balie-transcoder');

/**
 * Start a balie-transcoder worker on loopback with development certificates
 * (and captions, with the default model, when `captions`); resolves with its
 * address and the `[offload]` section for balie-sfu's config.
 */
export async function startWorker({ captions = false } = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'balie-e2e-worker-'));
  await sh(TRANSCODER, ['certs', '--out', dir]);
  const args = ['serve', '--listen', '127.0.0.1:0', '--metrics', '127.0.0.1:0',
    '--ca', join(dir, 'ca.pem'), '--cert', join(dir, 'worker.pem'), '--key', join(dir, 'worker.key')];
  if (captions) args.push('--captions', '--max-captions', '4');
  const proc = spawn(TRANSCODER, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: 'info', NO_COLOR: '1' } });
  let log = '';
  const addr = await new Promise((resolve, reject) => {
    const seen = (d) => {
      log += d;
      const m = /serving addr=(\S+)/.exec(log.replace(/\x1b\[[0-9;]*m/g, ''));
      if (m) resolve(m[1]);
    };
    proc.stdout.on('data', seen);
    proc.stderr.on('data', seen);
    proc.on('exit', (code) => reject(new Error(`balie-transcoder exited ${code}: ${log}`)));
    setTimeout(() => reject(new Error(`balie-transcoder did not start: ${log}`)), 30000);
  });
  const offload = [
    '[offload]', `workers = ["${addr}"]`, 'server_name = "localhost"',
    `ca = "${join(dir, 'ca.pem')}"`, `cert = "${join(dir, 'sfu.pem')}"`, `key = "${join(dir, 'sfu.key')}"`,
  ].join('\n');
  return {
    addr,
    offload,
    log: () => log,
    async stop() {
      proc.kill('SIGTERM');
      await new Promise((r) => proc.on('exit', r));
      rmSync(dir, { recursive: true, force: true });
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

/** Headless Chromium with a fake camera; inside network namespace `netns` if given, with extra `args`. */
export async function launch({ netns, args = [] } = {}) {
  const chromiumPath = process.env.CHROMIUM ?? '/usr/bin/chromium';
  let executablePath = chromiumPath;
  let wrapperDir;
  if (netns) {
    // Playwright talks to the browser over a pipe, so the browser can live in
    // another network namespace: a small wrapper puts it there.
    wrapperDir = mkdtempSync(join(tmpdir(), 'balie-e2e-'));
    executablePath = join(wrapperDir, 'chromium-in-netns');
    writeFileSync(executablePath, `#!/bin/sh\nexec ip netns exec ${netns} ${chromiumPath} "$@"\n`, { mode: 0o755 });
  }
  const browser = await chromium.launch({
    executablePath,
    args: [
      '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-quic',
      '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
      '--allow-loopback-in-peer-connection', '--autoplay-policy=no-user-gesture-required',
      ...args,
    ],
  });
  if (wrapperDir) browser.on('disconnected', () => rmSync(wrapperDir, { recursive: true, force: true }));
  return browser;
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
    // Besides what tests check, the counters that tell why a picture came
    // late (shown when a test fails).
    const r = {
      framesDecoded: 0, audioPackets: 0, frameWidth: 0,
      keyFramesDecoded: 0, packetsLost: 0, nackCount: 0, pliCount: 0, freezeCount: 0,
    };
    if (!pc) return r;
    (await pc.getStats()).forEach((s) => {
      if (s.type !== 'inbound-rtp') return;
      if (s.kind === 'video') {
        r.framesDecoded += s.framesDecoded ?? 0;
        r.frameWidth = Math.max(r.frameWidth, s.frameWidth ?? 0);
        for (const k of ['keyFramesDecoded', 'packetsLost', 'nackCount', 'pliCount', 'freezeCount']) {
          r[k] += s[k] ?? 0;
        }
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

/** Run a command; reject with its output when it fails. */
export function sh(cmd, args) {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    p.stdout.on('data', (d) => { out += d; });
    p.stderr.on('data', (d) => { out += d; });
    p.on('error', reject);
    p.on('exit', (code) => (code === 0 ? resolve(out) : reject(new Error(`${cmd} ${args.join(' ')}: exit ${code}: ${out}`))));
  });
}

/**
 * Two network namespaces of our own joined by a veth pair: `server` (10.201.0.1)
 * holds the SFU and the publishers, `client` (10.201.0.2) a subscriber whose
 * downlink `shape()` limits with tc on the server's side of the link. Needs
 * root (CAP_NET_ADMIN) and iproute2; nothing outside these namespaces is touched.
 */
export class Netns {
  constructor(tag = `${process.pid}`) {
    this.server = `balie-s-${tag}`;
    this.client = `balie-c-${tag}`;
    this.serverIp = '10.201.0.1';
    this.clientIp = '10.201.0.2';
    this.dev = 'balie-down';
  }

  async up() {
    if (process.getuid?.() !== 0) {
      throw new Error('the shaped-link browser tests need root (CAP_NET_ADMIN) to make network namespaces: run them as root');
    }
    await this.down();
    const { server, client } = this;
    await sh('ip', ['netns', 'add', server]);
    await sh('ip', ['netns', 'add', client]);
    await sh('ip', ['link', 'add', this.dev, 'netns', server, 'type', 'veth', 'peer', 'name', 'balie-up', 'netns', client]);
    await sh('ip', ['-n', server, 'addr', 'add', `${this.serverIp}/24`, 'dev', this.dev]);
    await sh('ip', ['-n', client, 'addr', 'add', `${this.clientIp}/24`, 'dev', 'balie-up']);
    for (const [ns, dev] of [[server, this.dev], [client, 'balie-up'], [server, 'lo'], [client, 'lo']]) {
      await sh('ip', ['-n', ns, 'link', 'set', dev, 'up']);
    }
  }

  /**
   * Limit the server-to-client direction to `kbit` kbit/s with a token bucket
   * whose queue holds at most `latencyMs` of data (tail drop beyond it), as a
   * mobile link's buffer does; `null` lifts the limit.
   */
  async shape(kbit, latencyMs = 200) {
    const tc = ['netns', 'exec', this.server, 'tc', 'qdisc'];
    if (kbit == null) {
      await sh('ip', [...tc, 'del', 'dev', this.dev, 'root']).catch(() => {});
      return;
    }
    await sh('ip', [...tc, 'replace', 'dev', this.dev, 'root', 'tbf', 'rate', `${kbit}kbit`, 'burst', '6kb', 'latency', `${latencyMs}ms`]);
  }

  async down() {
    for (const ns of [this.server, this.client]) await sh('ip', ['netns', 'del', ns]).catch(() => {});
  }
}
