// Screenshots of every view at phone and laptop width, for docs/screenshots/.
// Not a test:  cd tests/e2e && node screenshots.mjs
// (BALIE_SFU may point at the balie-sfu binary; default target/debug.)

import { mkdirSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startSfu, token, launch, newPage, until, inbound } from './harness.mjs';

const out = join(dirname(fileURLToPath(import.meta.url)), '../../docs/screenshots');
mkdirSync(out, { recursive: true });
const sfu = await startSfu();
const browser = await launch();
const sizes = { phone: { width: 360, height: 740 }, laptop: { width: 1280, height: 800 } };

for (const [size, viewport] of Object.entries(sizes)) {
  const room = `shots-${size}`;
  const shot = (page, name) => page.screenshot({ path: join(out, `${name}-${size}.png`), fullPage: true });
  const start = await newPage(browser, viewport);
  await start.goto(`${sfu.url}/`);
  await start.locator('#dev-form').waitFor();
  await shot(start, 'start');

  const c = await newPage(browser, viewport);
  await c.goto(`${sfu.url}/join?token=${token({ room, sub: 'c', name: 'Anna de Vries', role: 'citizen', loa: 'substantieel' })}`);
  await c.locator('#view-prejoin').waitFor();
  await shot(c, 'prejoin');
  await c.getByRole('button', { name: 'Start het gesprek' }).click();
  await c.locator('#view-waiting').waitFor();
  await new Promise((r) => setTimeout(r, 500));
  await shot(c, 'waiting');

  const o = await newPage(browser, viewport);
  await o.goto(`${sfu.url}/join?token=${token({ room, sub: 'o', name: 'Bram Jansen', role: 'official', loa: 'midden' })}`);
  await o.getByRole('button', { name: 'Start het gesprek' }).click();
  await o.locator('#people li', { hasText: 'Anna de Vries' }).waitFor();
  await shot(o, 'official-waiting');
  await o.locator('#people li', { hasText: 'Anna de Vries' }).getByRole('button', { name: /Binnenlaten/ }).click();
  await c.locator('#view-call').waitFor();
  for (const p of [c, o]) await until(async () => (await inbound(p)).framesDecoded > 20, 20000, 'video');
  await new Promise((r) => setTimeout(r, 1000));
  await shot(c, 'citizen-call');
  await shot(o, 'official-call');
  await c.getByRole('button', { name: 'Gesprek verlaten' }).click();
  await c.locator('#view-ended').waitFor();
  await shot(c, 'ended');
  for (const p of [start, c, o]) await p.context().close();
}
await browser.close();
await sfu.stop();
console.log(`screenshots in ${out}`);
