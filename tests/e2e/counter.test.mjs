// The counter in a real browser: headless Chromium with a fake camera and
// microphone, through balie-sfu on loopback.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import AxeBuilder from '@axe-core/playwright';
import { startSfu, token, launch, newPage, inbound, until, videoBytesSent } from './harness.mjs';

let sfu;
let browser;

before(async () => {
  sfu = await startSfu('min_loa = "midden"\nmax_participants = 2');
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await sfu?.stop();
});

const citizen = (room, extra = {}) => token({ room, sub: 'c-1', name: 'Anna de Vries', role: 'citizen', loa: 'substantieel', ...extra });
const official = (room, extra = {}) => token({ room, sub: 'o-1', name: 'Bram Jansen', role: 'official', loa: 'midden', ...extra });

async function axe(page, view) {
  const result = await new AxeBuilder({ page }).withTags(['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']).analyze();
  const bad = result.violations.filter((v) => v.impact === 'serious' || v.impact === 'critical');
  const others = result.violations.length - bad.length;
  console.log(`axe ${view}: ${bad.length} serious/critical, ${others} other violations${others ? ': ' + result.violations.filter((v) => !bad.includes(v)).map((v) => v.id).join(', ') : ''}`);
  assert.deepEqual(bad.map((v) => `${v.id}: ${v.help}`), [], `${view}: serious or critical accessibility violations`);
}

test('citizen waits, official admits, both see and hear each other, citizen leaves', async () => {
  const room = 'e2e-call';
  const c = await newPage(browser);
  const o = await newPage(browser);
  await c.goto(`${sfu.url}/join?token=${citizen(room)}`);
  await axe(c, 'prejoin');
  await c.getByRole('button', { name: 'Start het gesprek' }).click();
  await c.getByRole('heading', { name: 'Even geduld' }).waitFor();
  await axe(c, 'waiting');

  await o.goto(`${sfu.url}/join?token=${official(room)}`);
  await o.getByRole('button', { name: 'Start het gesprek' }).click();
  await o.locator('#view-call').waitFor();
  // The official sees who waits, with the DigiD level as verified.
  const person = o.locator('#people li', { hasText: 'Anna de Vries' });
  await person.waitFor();
  assert.match(await person.innerText(), /DigiD Substantieel/);
  assert.match(await person.innerText(), /wacht/);
  await axe(o, 'official in call');

  // Nothing flows while the citizen waits.
  await new Promise((r) => setTimeout(r, 1500));
  assert.equal((await inbound(c)).framesDecoded, 0, 'a waiting citizen receives no video');

  await person.getByRole('button', { name: /Binnenlaten/ }).click();
  await c.locator('#view-call').waitFor();
  await axe(c, 'citizen in call');

  // Each receives the other's video (framesDecoded rising) and audio.
  for (const [page, who] of [[c, 'citizen'], [o, 'official']]) {
    const first = await until(async () => {
      const s = await inbound(page);
      return s.framesDecoded > 10 && s.audioPackets > 20 ? s : null;
    }, 20000, `${who} receives video and audio`);
    const later = await until(async () => {
      const s = await inbound(page);
      return s.framesDecoded > first.framesDecoded + 10 && s.audioPackets > first.audioPackets + 20 ? s : null;
    }, 10000, `${who} keeps receiving`);
    console.log(`${who}: framesDecoded ${later.framesDecoded}, audio packets ${later.audioPackets}, width ${later.frameWidth}`);
  }

  await c.getByRole('button', { name: 'Gesprek verlaten' }).click();
  await c.getByRole('heading', { name: 'Het gesprek is afgelopen' }).waitFor();
  await axe(c, 'ended');
  await until(async () => (await o.locator('#people li', { hasText: 'Anna de Vries' }).count()) === 0, 10000, 'the official sees the citizen leave');
  await c.context().close();
  await o.context().close();
});

test('a citizen below the room\'s DigiD level is refused and told why', async () => {
  const c = await newPage(browser);
  await c.goto(`${sfu.url}/join?token=${citizen('e2e-loa', { loa: 'basis' })}`);
  await c.getByRole('button', { name: 'Start het gesprek' }).click();
  await c.getByRole('heading', { name: 'Het gesprek is afgelopen' }).waitFor();
  const text = await c.locator('#ended-text').innerText();
  assert.match(text, /hoger DigiD-niveau/);
  assert.match(text, /DigiD Midden/);
  await c.context().close();
});

test('keyboard only: a citizen joins, toggles microphone and camera, and leaves', async () => {
  const room = 'e2e-keys';
  const c = await newPage(browser, { width: 360, height: 740 });
  const o = await newPage(browser);
  await c.goto(`${sfu.url}/join?token=${citizen(room)}`);
  const focused = () => c.evaluate(() => document.activeElement?.id || document.activeElement?.textContent?.trim());
  // Tab to the start button and press Enter.
  for (let i = 0; i < 6 && (await focused()) !== 'start'; i++) await c.keyboard.press('Tab');
  assert.equal(await focused(), 'start');
  await c.keyboard.press('Enter');
  await c.getByRole('heading', { name: 'Even geduld' }).waitFor();

  await o.goto(`${sfu.url}/join?token=${official(room)}`);
  await o.getByRole('button', { name: 'Start het gesprek' }).click();
  await o.locator('#people li', { hasText: 'Anna de Vries' }).getByRole('button', { name: /Binnenlaten/ }).click();
  await c.locator('#view-call').waitFor();

  for (const [id, key] of [['mic', 'Space'], ['cam', 'Space'], ['leave', 'Enter']]) {
    for (let i = 0; i < 12 && (await focused()) !== id; i++) await c.keyboard.press('Tab');
    assert.equal(await focused(), id, `Tab reaches ${id}`);
    if (id !== 'leave') assert.equal(await c.locator(`#${id}`).getAttribute('aria-pressed'), 'true');
    await c.keyboard.press(key);
    if (id !== 'leave') assert.equal(await c.locator(`#${id}`).getAttribute('aria-pressed'), 'false', `${id} toggled off`);
  }
  await c.getByRole('heading', { name: 'Het gesprek is afgelopen' }).waitFor();
  await c.context().close();
  await o.context().close();
});

test('the start page: no token explains what to do; in development it makes a link', async () => {
  const p = await newPage(browser, { width: 360, height: 740 });
  await p.goto(`${sfu.url}/`);
  await p.getByRole('heading', { name: 'Welkom bij de digitale balie' }).waitFor();
  await p.locator('#dev-form').waitFor();
  await axe(p, 'start');
  await p.getByLabel('Naam').fill('Test Persoon');
  await p.getByLabel('Rol').selectOption('official');
  await p.getByRole('button', { name: 'Maak link en ga naar binnen' }).click();
  await p.getByRole('heading', { name: 'Klaar voor uw gesprek?' }).waitFor();
  assert.match(p.url(), /\/join\?token=/);
  // English is one click away.
  await p.getByRole('button', { name: 'English' }).click();
  await p.getByRole('heading', { name: 'Ready for your conversation?' }).waitFor();
  await p.context().close();
});

test('what people see when things go wrong, in plain words', async () => {
  const expectEnd = async (page, pattern, what) => {
    await page.getByRole('heading', { name: 'Het gesprek is afgelopen' }).waitFor();
    assert.match(await page.locator('#ended-text').innerText(), pattern, what);
  };
  // An expired link: said before anything else happens.
  const p1 = await newPage(browser);
  await p1.goto(`${sfu.url}/join?token=${citizen('e2e-err', { exp: Math.floor(Date.now() / 1000) - 60 })}`);
  await expectEnd(p1, /link is verlopen/, 'expired token');
  await p1.context().close();

  // Camera or microphone denied, and no camera at all.
  for (const [name, pattern] of [['NotAllowedError', /geen toestemming/], ['NotFoundError', /geen camera of microfoon/]]) {
    const p = await newPage(browser);
    await p.addInitScript((n) => {
      navigator.mediaDevices.getUserMedia = async () => { throw new DOMException('test', n); };
    }, name);
    await p.goto(`${sfu.url}/join?token=${official('e2e-err')}`);
    await p.getByRole('button', { name: 'Start het gesprek' }).click();
    await expectEnd(p, pattern, name);
    assert.equal(await p.locator('#again').isVisible(), true, 'a retry button is offered');
    await p.context().close();
  }

  // A full room (max_participants = 2 in this server's config).
  const room = 'e2e-full';
  const pages = [];
  for (const who of ['a', 'b']) {
    const p = await newPage(browser);
    await p.goto(`${sfu.url}/join?token=${official(room, { sub: who })}`);
    await p.getByRole('button', { name: 'Start het gesprek' }).click();
    await p.locator('#view-call').waitFor();
    pages.push(p);
  }
  const third = await newPage(browser);
  await third.goto(`${sfu.url}/join?token=${citizen(room)}`);
  await third.getByRole('button', { name: 'Start het gesprek' }).click();
  await expectEnd(third, /balie is vol/, 'room full');
  for (const p of [...pages, third]) await p.context().close();
});

test('connection lost: the client retries with ICE restarts, then says so clearly', async () => {
  const own = await startSfu();
  const p = await newPage(browser);
  try {
    await p.goto(`${own.url}/join?token=${official('e2e-lost')}`);
    await p.getByRole('button', { name: 'Start het gesprek' }).click();
    await p.locator('#view-call').waitFor();
    await until(() => p.evaluate(() => window.balie.state.pc?.iceConnectionState === 'connected'), 10000, 'connected');
    await p.evaluate(() => { window.balie.state.reconnectWindowMs = 8000; });
    own.pause();
    await until(async () => (await p.locator('#quality').getAttribute('data-quality')) === 'reconnecting', 20000, 'the page shows it reconnects');
    await p.getByRole('heading', { name: 'Het gesprek is afgelopen' }).waitFor({ timeout: 30000 });
    assert.match(await p.locator('#ended-text').innerText(), /verbinding is verbroken/);
  } finally {
    own.resume();
    await p.context().close();
    await own.stop();
  }
});

test('a short outage: the ICE restart brings the call back', async () => {
  const own = await startSfu();
  const room = 'e2e-restart';
  const o = await newPage(browser);
  const i = await newPage(browser);
  try {
    for (const [p, who] of [[o, 'o'], [i, 'i']]) {
      await p.goto(`${own.url}/join?token=${official(room, { sub: who, role: who === 'o' ? 'official' : 'interpreter' })}`);
      await p.getByRole('button', { name: 'Start het gesprek' }).click();
      await p.locator('#view-call').waitFor();
    }
    await until(async () => (await inbound(o)).framesDecoded > 10, 20000, 'video flows');
    own.pause();
    await until(async () => (await o.locator('#quality').getAttribute('data-quality')) === 'reconnecting', 20000, 'the page notices');
    own.resume();
    const before = (await inbound(o)).framesDecoded;
    try {
      await until(async () => (await inbound(o)).framesDecoded > before + 30, 30000, 'video flows again');
    } catch (e) {
      const m = await (await fetch(`${own.url}/metrics`)).text();
      console.log(m.split('\n').filter((l) => /layer|keyframe|bwe_estimate_bps_(sum|count)|frames_forwarded/.test(l)).join('\n'));
      console.log(JSON.stringify(await inbound(o)), JSON.stringify(await inbound(i)));
      console.log(own.log().split('\n').slice(-15).join('\n'));
      console.log(await o.evaluate(() => `${document.body.dataset.view} ${window.balie.state.pc?.iceConnectionState} ${document.getElementById('ended-text').textContent}`));
      throw e;
    }
    assert.equal(await o.locator('#view-call').isVisible(), true, 'still in the call');
    assert.match(own.log(), /ice restart/, 'the client restarted ICE through PATCH');
  } finally {
    own.resume();
    await o.context().close();
    await i.context().close();
    await own.stop();
  }
});

test('a subscriber that shows the video small receives the low simulcast layer', async () => {
  const room = 'e2e-small';
  // The publisher: an interpreter (no waiting room) sending q/h/f (320x180,
  // 640x360, 1280x720) from the fake camera; the subscriber's window is tiny.
  const pub = await newPage(browser);
  const small = await newPage(browser, { width: 240, height: 500 });
  try {
    await pub.goto(`${sfu.url}/join?token=${official(room, { sub: 'p', role: 'interpreter' })}`);
    await pub.getByRole('button', { name: 'Start het gesprek' }).click();
    await pub.locator('#view-call').waitFor();
    // Alone, nobody shows its video: the server tells it to stop sending.
    await until(async () => {
      const a = await videoBytesSent(pub);
      await new Promise((r) => setTimeout(r, 1000));
      return (await videoBytesSent(pub)) === a;
    }, 10000, 'a publisher nobody watches stops sending video');
    await small.goto(`${sfu.url}/join?token=${official(room, { sub: 's' })}`);
    await small.getByRole('button', { name: 'Start het gesprek' }).click();
    await small.locator('#view-call').waitFor();
    const shown = await small.evaluate(() => document.getElementById('remote').clientHeight);
    // About 120 lines shown: the lowest layer (180 lines) is enough.
    let last;
    const s = await until(async () => {
      const r = await inbound(small);
      last = r;
      return r.framesDecoded > 20 && r.frameWidth > 0 && r.frameWidth <= 320 ? r : null;
    }, 20000, 'the small subscriber gets the low layer').catch((e) => { throw new Error(`${e.message}; last ${JSON.stringify(last)}`); });
    console.log(`small window (video ${shown} px tall): frameWidth ${s.frameWidth}`);
    const a = await videoBytesSent(pub);
    await new Promise((r) => setTimeout(r, 1000));
    assert.ok((await videoBytesSent(pub)) > a, 'watched again: it sends');
  } finally {
    await pub.context().close();
    await small.context().close();
  }
});
