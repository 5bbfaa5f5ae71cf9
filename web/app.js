// The counter client: join by link, wait, talk, leave. Plain ES module, no build.
//
// Signalling: one HTTP POST with the offer (docs/signalling.md), then JSON
// messages on the data channel `balie`. The server adds m-lines for others'
// tracks through `offer` messages and says which participant each one carries.

import { t, applyTexts, toggleLang, currentLang } from './i18n.js';

const $ = (id) => document.getElementById(id);
const VIEWS = ['start', 'prejoin', 'waiting', 'call', 'ended'];

const state = {
  token: null,
  claims: null,
  pc: null,
  channel: null,
  stream: null,
  me: null,             // my roster entry
  people: new Map(),    // id -> roster entry
  midToPeer: new Map(), // mid -> participant id
  midKind: new Map(),   // mid -> 'audio' | 'video'
  sentSizes: new Map(), // mid -> "WxH" last reported
  shown: null,          // participant id of the large video
  remoteStreams: new Map(), // participant id -> MediaStream
  dtlsSetup: 'passive', // the server's DTLS role from its first answer
  location: null,       // session URL
  ended: false,
  restartUntil: 0,
  // How long the client tries ICE restarts after losing the connection.
  reconnectWindowMs: 30_000,
  restarting: false,
  captions: null,       // the last captions-state from the server
  partials: new Map(),  // participant id -> the element of their partial caption
  captionSize: Number(localStorage.getItem('balie-caption-size')) || 3,
};

// Caption text sizes (rem), chosen with A− / A+.
const CAPTION_SIZES = [1, 1.125, 1.25, 1.5, 1.75, 2, 2.5];
// Caption lines kept on screen (older ones scroll away).
const CAPTION_LINES = 60;

// ---- views and announcements -------------------------------------------------

function show(view) {
  for (const v of VIEWS) $(`view-${v}`).hidden = v !== view;
  document.body.dataset.view = view;
  // Move focus to the new view's heading, so screen readers and keyboard
  // users start there.
  const h = $(`view-${view}`).querySelector('h1');
  if (h) { h.tabIndex = -1; h.focus(); }
}

function announce(text) {
  $('status').textContent = '';
  setTimeout(() => { $('status').textContent = text; }, 50);
}

function end(key, canRetry = false) {
  if (state.ended) return;
  state.ended = true;
  $('ended-text').textContent = t(key);
  $('ended-text').dataset.t = key;
  $('again').hidden = !canRetry;
  stopEverything();
  show('ended');
}

function stopEverything() {
  try { state.channel?.close(); } catch { /* already closed */ }
  try { state.pc?.close(); } catch { /* already closed */ }
  for (const tr of state.stream?.getTracks() ?? []) tr.stop();
}

// ---- the token -----------------------------------------------------------------

function decodeClaims(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const json = decodeURIComponent(escape(atob(part)));
    return JSON.parse(json);
  } catch {
    return null;
  }
}

// ---- joining -------------------------------------------------------------------

async function getMedia() {
  try {
    return await navigator.mediaDevices.getUserMedia({
      audio: true,
      video: { width: { ideal: 1280 }, height: { ideal: 720 } },
    });
  } catch (e) {
    if (e.name === 'NotAllowedError' || e.name === 'SecurityError') throw new Error('error.denied');
    if (e.name === 'NotFoundError' || e.name === 'OverconstrainedError') throw new Error('error.nocamera');
    throw new Error('error.other');
  }
}

function waitIceGathering(pc, ms = 2000) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { pc.removeEventListener('icegatheringstatechange', check); resolve(); };
    const check = () => { if (pc.iceGatheringState === 'complete') done(); };
    pc.addEventListener('icegatheringstatechange', check);
    setTimeout(done, ms);
  });
}

const HTTP_ERRORS = {
  token_expired: 'error.expired',
  token_invalid: 'error.token',
  token_missing: 'error.token',
  wrong_room: 'error.token',
  not_allowed: 'error.token',
  room_full: 'error.full',
  loa_too_low: 'error.loa',
  draining: 'error.busy',
  shard_unavailable: 'error.busy',
};

async function join() {
  $('start').disabled = true;
  try {
    state.stream = await getMedia();
  } catch (e) {
    $('start').disabled = false;
    return end(e.message, true);
  }
  $('self').srcObject = state.stream;
  $('self-waiting').srcObject = state.stream;

  const pc = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
  state.pc = pc;
  const [audio] = state.stream.getAudioTracks();
  const [video] = state.stream.getVideoTracks();
  if (state.claims?.can_publish !== false && state.claims?.role !== 'observer') {
    if (audio) pc.addTransceiver(audio, { direction: 'sendonly', streams: [state.stream] });
    if (video) {
      pc.addTransceiver(video, {
        direction: 'sendonly',
        streams: [state.stream],
        sendEncodings: [
          { rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 150_000 },
          { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 500_000 },
          { rid: 'f', maxBitrate: 1_500_000 },
        ],
      });
    }
  }
  const channel = pc.createDataChannel('balie');
  state.channel = channel;
  channel.onmessage = (e) => onMessage(JSON.parse(e.data));
  pc.ontrack = (e) => onTrack(e);
  pc.oniceconnectionstatechange = () => onIceState();

  await pc.setLocalDescription(await pc.createOffer());
  await waitIceGathering(pc);
  let resp;
  try {
    resp = await fetch(`/v1/rooms/${encodeURIComponent(state.claims.room)}/sessions`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/sdp', Authorization: `Bearer ${state.token}` },
      body: pc.localDescription.sdp,
    });
  } catch {
    return end('error.busy', true);
  }
  if (resp.status !== 201) {
    let code = 'other';
    let reason = '';
    try { const body = await resp.json(); code = body.code; reason = body.error; } catch { /* not JSON */ }
    end(HTTP_ERRORS[code] ?? 'error.other', code === 'draining' || code === 'room_full');
    if (code === 'loa_too_low' && reason) $('ended-text').textContent = `${t('error.loa')} (${reason})`;
    return;
  }
  state.location = resp.headers.get('Location');
  const sdp = await resp.text();
  state.dtlsSetup = /a=setup:(\w+)/.exec(sdp)?.[1] ?? 'passive';
  await pc.setRemoteDescription({ type: 'answer', sdp });
  window.addEventListener('pagehide', () => leave(true));
  startQualityMonitor();
}

// ---- in-call messages ----------------------------------------------------------

function send(msg) {
  if (state.channel?.readyState === 'open') state.channel.send(JSON.stringify(msg));
}

async function onMessage(msg) {
  switch (msg.type) {
    case 'welcome':
      state.me = msg.you;
      state.people = new Map(msg.participants.map((p) => [p.id, p]));
      enterByState();
      renderPeople();
      break;
    case 'participant-joined':
      state.people.set(msg.participant.id, msg.participant);
      announce(t(msg.participant.state === 'waiting' ? 'announce.waiting' : 'announce.joined', { name: nameOf(msg.participant) }));
      renderPeople();
      break;
    case 'participant-updated': {
      const p = msg.participant;
      state.people.set(p.id, p);
      if (state.me && p.id === state.me.id) {
        const was = state.me.state;
        state.me = p;
        if (was !== p.state) announce(t(p.state === 'admitted' ? 'announce.admitted' : 'announce.held'));
        enterByState();
      } else if (p.state === 'waiting') {
        announce(t('announce.waiting', { name: nameOf(p) }));
      }
      renderPeople();
      break;
    }
    case 'participant-left': {
      const p = state.people.get(msg.id);
      state.people.delete(msg.id);
      state.remoteStreams.delete(msg.id);
      if (p) announce(t('announce.left', { name: nameOf(p) }));
      renderPeople();
      renderRemote();
      break;
    }
    case 'offer':
      for (const tr of msg.tracks) { state.midToPeer.set(tr.mid, tr.participant); state.midKind.set(tr.mid, tr.kind); }
      await state.pc.setRemoteDescription({ type: 'offer', sdp: msg.sdp });
      await state.pc.setLocalDescription(await state.pc.createAnswer());
      send({ type: 'answer', sdp: state.pc.localDescription.sdp });
      break;
    case 'answer':
      await state.pc.setRemoteDescription({ type: 'answer', sdp: msg.sdp });
      break;
    case 'tracks':
      for (const tr of msg.tracks) { state.midToPeer.set(tr.mid, tr.participant); state.midKind.set(tr.mid, tr.kind); }
      reportSizes();
      break;
    case 'send-video':
      await sendVideo(msg.mid, msg.send);
      break;
    case 'captions-state':
      renderCaptionsState(msg);
      break;
    case 'caption':
      onCaption(msg);
      break;
    case 'unmute-requested':
      announce(t('announce.unmute'));
      $('mic').focus();
      break;
    case 'bye':
      end(msg.reason === 'drain' ? 'ended.drain' : 'ended.removed', msg.reason === 'drain');
      break;
    case 'error':
      console.warn('balie:', msg.code, msg.message);
      break;
    default:
      break;
  }
}

function enterByState() {
  if (state.ended) return;
  show(state.me?.state === 'waiting' ? 'waiting' : 'call');
  $('official-panel').hidden = state.me?.role !== 'official';
  reportSizes();
}

function nameOf(p) {
  return p.name || t(`role.${p.role}`);
}

/** Stop or resume sending our video: nobody shows it (or somebody does again). */
async function sendVideo(mid, send) {
  const tr = state.pc?.getTransceivers().find((t) => t.mid === mid);
  if (!tr?.sender) return;
  const params = tr.sender.getParameters();
  if (!params.encodings?.length) return;
  for (const e of params.encodings) e.active = send;
  try { await tr.sender.setParameters(params); } catch (e) { console.warn('balie: send-video', e); }
}

// ---- media from others ---------------------------------------------------------

function onTrack(e) {
  const mid = e.transceiver?.mid;
  const who = state.midToPeer.get(mid) ?? e.streams[0]?.id ?? 'unknown';
  let stream = state.remoteStreams.get(who);
  if (!stream) {
    stream = new MediaStream();
    state.remoteStreams.set(who, stream);
  }
  stream.addTrack(e.track);
  e.track.addEventListener('ended', () => stream.removeTrack(e.track));
  renderRemote();
}

/** One hidden <audio> per participant, so everyone is heard, shown or not. */
function renderAudio() {
  const sinks = $('audio-sinks');
  for (const el of [...sinks.children]) {
    if (!state.remoteStreams.has(el.dataset.peer)) el.remove();
  }
  for (const [id, stream] of state.remoteStreams) {
    if (!sinks.querySelector(`[data-peer="${CSS.escape(id)}"]`)) {
      const a = document.createElement('audio');
      a.autoplay = true;
      a.dataset.peer = id;
      a.srcObject = stream;
      sinks.append(a);
    }
  }
}

/** The large video: the citizen for officials, an official for everyone else. */
function renderRemote() {
  renderAudio();
  const wanted = state.me?.role === 'official' ? ['citizen', 'interpreter', 'official'] : ['official', 'interpreter', 'citizen'];
  let pick = null;
  for (const role of wanted) {
    for (const [id, stream] of state.remoteStreams) {
      if (!pick && state.people.get(id)?.role === role && stream.getTracks().length) pick = stream;
    }
  }
  if (!pick) pick = [...state.remoteStreams.values()].find((s) => s.getTracks().length) ?? null;
  if ($('remote').srcObject !== pick) $('remote').srcObject = pick;
  $('remote-empty').hidden = !!pick;
  state.shown = pick ? [...state.remoteStreams].find(([, s]) => s === pick)?.[0] : null;
  reportSizes();
}

/**
 * Tell the server how large each received video is shown (docs/signalling.md,
 * `video-size`): the large one at its size in device pixels, the others 0x0
 * (hidden), so the server sends the layer that fits and nothing for hidden ones.
 */
function reportSizes() {
  const el = $('remote');
  const scale = window.devicePixelRatio || 1;
  for (const [mid, who] of state.midToPeer) {
    if (state.midKind.get(mid) !== 'video') continue;
    const shown = who === state.shown && !$('view-call').hidden;
    const w = shown ? Math.round(el.clientWidth * scale) : 0;
    const h = shown ? Math.round(el.clientHeight * scale) : 0;
    const key = `${w}x${h}`;
    if (state.sentSizes.get(mid) === key) continue;
    state.sentSizes.set(mid, key);
    send({ type: 'video-size', track: mid, width: w, height: h });
  }
}

// ---- the official's list -------------------------------------------------------

function loaLabel(loa) {
  return loa ? `DigiD ${loa[0].toUpperCase()}${loa.slice(1)}` : t('people.noloa');
}

function renderPeople() {
  const list = $('people');
  list.replaceChildren();
  const isOfficial = state.me?.role === 'official';
  for (const p of state.people.values()) {
    const li = document.createElement('li');
    li.className = `person ${p.state}`;
    const who = document.createElement('p');
    who.className = 'nl-paragraph who';
    const you = state.me && p.id === state.me.id ? ` ${t('people.you')}` : '';
    who.textContent = `${nameOf(p)}${you} · ${t(`role.${p.role}`)} · ${loaLabel(p.loa)} · ${t(p.state === 'waiting' ? 'people.waiting' : 'people.in')}`;
    li.append(who);
    if (isOfficial && p.id !== state.me.id && p.role !== 'official') {
      const actions = document.createElement('div');
      actions.className = 'actions';
      const button = (key, type, cls) => {
        const b = document.createElement('button');
        b.type = 'button';
        b.className = `nl-button ${cls}`;
        b.textContent = t(key);
        b.setAttribute('aria-label', `${t(key)}: ${nameOf(p)}`);
        b.addEventListener('click', () => send({ type, id: p.id }));
        actions.append(b);
      };
      if (p.state === 'waiting') button('action.admit', 'admit', 'nl-button--primary');
      else button('action.hold', 'hold', 'nl-button--secondary');
      if (p.state !== 'waiting') button('action.unmute', 'request-unmute', 'nl-button--secondary');
      button('action.remove', 'remove', 'nl-button--secondary nl-button--negative');
      li.append(actions);
    }
    list.append(li);
  }
}

// ---- captions ------------------------------------------------------------------

/** The room's captions were switched, or became (un)available. */
function renderCaptionsState(msg) {
  const was = state.captions;
  state.captions = msg;
  $('captions-panel').hidden = false;
  const key = !msg.on ? 'captions.off' : msg.available ? 'captions.on' : 'captions.unavailable';
  const notice = $('captions-notice');
  notice.dataset.t = key;
  notice.textContent = t(key);
  const sw = $('captions-switch');
  sw.hidden = state.me?.role !== 'official';
  sw.setAttribute('aria-pressed', String(msg.on));
  sw.dataset.t = msg.on ? 'captions.switch.off' : 'captions.switch.on';
  sw.textContent = t(sw.dataset.t);
  if (!msg.on) {
    for (const el of state.partials.values()) el.remove();
    state.partials.clear();
  }
  // Tell screen reader users too, when it changed.
  if (was && (was.on !== msg.on || was.available !== msg.available)) announce(t(key));
  else if (!was && msg.on) announce(t(key));
}

/** A caption: a partial replaces the speaker's previous partial; a final
 *  takes its place, and joins the speaker's last line when nobody spoke
 *  in between. */
function onCaption(msg) {
  const box = $('captions');
  const who = state.people.get(msg.participant);
  const name = msg.name || (who ? nameOf(who) : '');
  const old = state.partials.get(msg.participant);
  if (!msg.final) {
    const line = old ?? document.createElement('p');
    line.className = 'partial';
    // Partials change every second: screen readers get the final text only.
    line.setAttribute('aria-hidden', 'true');
    line.title = t('captions.partial');
    line.replaceChildren(speakerLabel(name), document.createTextNode(msg.text));
    line.dataset.participant = msg.participant;
    if (!old) box.append(line);
    state.partials.set(msg.participant, line);
    box.scrollTop = box.scrollHeight;
    return;
  }
  old?.remove();
  state.partials.delete(msg.participant);
  const last = lastLine(box);
  const text = document.createElement('span');
  text.className = 'text';
  if (last?.dataset.participant === msg.participant) {
    text.textContent = ` ${msg.text}`;
    last.append(text);
  } else {
    const line = document.createElement('p');
    line.className = 'final';
    line.dataset.participant = msg.participant;
    text.textContent = msg.text;
    line.append(speakerLabel(name), text);
    // Before the partials of others, which are still being spoken.
    const firstPartial = box.querySelector('p.partial');
    box.insertBefore(line, firstPartial);
  }
  while (box.querySelectorAll('p.final').length > CAPTION_LINES) box.querySelector('p.final').remove();
  box.scrollTop = box.scrollHeight;
}

/** The newest final line (partials come after the finals). */
function lastLine(box) {
  return [...box.querySelectorAll('p.final')].pop();
}

function speakerLabel(name) {
  const span = document.createElement('span');
  span.className = 'speaker';
  span.textContent = name ? `${name}: ` : '';
  return span;
}

function setCaptionSize(step) {
  state.captionSize = Math.max(0, Math.min(CAPTION_SIZES.length - 1, state.captionSize + step));
  localStorage.setItem('balie-caption-size', String(state.captionSize));
  $('captions').style.setProperty('--caption-size', `${CAPTION_SIZES[state.captionSize]}rem`);
  $('captions-smaller').disabled = state.captionSize === 0;
  $('captions-larger').disabled = state.captionSize === CAPTION_SIZES.length - 1;
}

// ---- controls ------------------------------------------------------------------

function toggle(kind) {
  const tracks = kind === 'mic' ? state.stream?.getAudioTracks() : state.stream?.getVideoTracks();
  if (!tracks?.length) return;
  const on = !tracks[0].enabled;
  for (const tr of tracks) tr.enabled = on;
  const b = $(kind);
  b.setAttribute('aria-pressed', String(on));
  b.dataset.t = `control.${kind}.${on ? 'on' : 'off'}`;
  b.textContent = t(b.dataset.t);
}

function leave(silent = false) {
  send({ type: 'leave' });
  if (state.location) {
    fetch(state.location, { method: 'DELETE', keepalive: true }).catch(() => {});
  }
  if (!silent) end('ended.left');
}

// ---- connection quality and ICE restarts ----------------------------------------

function onIceState() {
  const s = state.pc?.iceConnectionState;
  if (s === 'disconnected' || s === 'failed') {
    if (!state.restartUntil) state.restartUntil = Date.now() + state.reconnectWindowMs;
    setQuality('reconnecting');
    announce(t('quality.reconnecting'));
    reconnect();
  } else if (s === 'connected' || s === 'completed') {
    state.restartUntil = 0;
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Try ICE restarts until the connection is back or the window has passed. */
async function reconnect() {
  if (state.restarting) return;
  state.restarting = true;
  try {
    while (!state.ended && state.restartUntil) {
      const s = state.pc?.iceConnectionState;
      if (s === 'connected' || s === 'completed') break;
      if (Date.now() > state.restartUntil) { end('ended.lost', true); break; }
      if ((await iceRestart()) === 'gone') { end('ended.lost', true); break; }
      await sleep(2000);
    }
  } finally {
    state.restarting = false;
  }
}

/** One ICE restart through PATCH on the session URL (as WHIP does). */
async function iceRestart() {
  try {
    const offer = await state.pc.createOffer({ iceRestart: true });
    await state.pc.setLocalDescription(offer);
    await waitIceGathering(state.pc, 1000);
    const sdp = state.pc.localDescription.sdp;
    const frag = sdp.split(/\r?\n/).filter((l) => /^a=(ice-ufrag|ice-pwd|candidate):/.test(l)).join('\r\n') + '\r\n';
    const resp = await fetch(state.location, {
      method: 'PATCH',
      headers: { 'Content-Type': 'application/trickle-ice-sdpfrag' },
      body: frag,
      signal: AbortSignal.timeout(3000),
    });
    if (resp.status === 404) return 'gone';
    if (resp.status !== 200) return 'retry';
    const answerFrag = await resp.text();
    const ufrag = /a=ice-ufrag:(\S+)/.exec(answerFrag)?.[1];
    const pwd = /a=ice-pwd:(\S+)/.exec(answerFrag)?.[1];
    // The answer is the session as it stands (the latest remote description,
    // which may be a server offer) with the new credentials and the DTLS role
    // fixed by the first answer.
    const answer = state.pc.currentRemoteDescription.sdp
      .replace(/a=ice-ufrag:\S+/g, `a=ice-ufrag:${ufrag}`)
      .replace(/a=ice-pwd:\S+/g, `a=ice-pwd:${pwd}`)
      .replace(/a=setup:actpass/g, `a=setup:${state.dtlsSetup}`);
    await state.pc.setRemoteDescription({ type: 'answer', sdp: answer });
    return 'sent';
  } catch {
    // The network (or the server) is unreachable: the caller tries again.
    if (state.pc?.signalingState === 'have-local-offer') {
      await state.pc.setLocalDescription({ type: 'rollback' }).catch(() => {});
    }
    return 'retry';
  }
}

function setQuality(q) {
  $('quality').dataset.quality = q;
  $('quality-text').dataset.t = `quality.${q}`;
  $('quality-text').textContent = t(`quality.${q}`);
}

function startQualityMonitor() {
  let last = null;
  const timer = setInterval(async () => {
    if (state.ended || !state.pc) return clearInterval(timer);
    if (state.restartUntil) return;
    const stats = await state.pc.getStats();
    let rtt = 0;
    let lost = 0;
    let received = 0;
    stats.forEach((s) => {
      if (s.type === 'candidate-pair' && s.nominated && s.currentRoundTripTime) rtt = s.currentRoundTripTime;
      if (s.type === 'inbound-rtp') { lost += s.packetsLost ?? 0; received += s.packetsReceived ?? 0; }
    });
    const now = { lost, received };
    let loss = 0;
    if (last) {
      const dl = now.lost - last.lost;
      const dr = now.received - last.received;
      loss = dl + dr > 0 ? dl / (dl + dr) : 0;
    }
    last = now;
    setQuality(loss > 0.1 || rtt > 0.5 ? 'poor' : loss > 0.02 || rtt > 0.25 ? 'fair' : 'good');
  }, 2000);
}

// ---- start -----------------------------------------------------------------------

async function devForm() {
  let info = { dev: false };
  try { info = await (await fetch('/v1/info')).json(); } catch { /* no info: not dev */ }
  if (!info.dev) return;
  const form = $('dev-form');
  form.hidden = false;
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const data = Object.fromEntries(new FormData(form));
    const resp = await fetch('/dev/token', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ ...data, loa: data.loa || null }),
    });
    if (!resp.ok) return end('error.other', true);
    const { token } = await resp.json();
    location.href = `/join?token=${encodeURIComponent(token)}`;
  });
}

function main() {
  applyTexts();
  $('lang').textContent = t('lang.other');
  $('lang').addEventListener('click', () => {
    toggleLang();
    $('lang').textContent = t('lang.other');
    renderPeople();
    if (state.captions) renderCaptionsState(state.captions);
  });
  $('captions-switch').addEventListener('click', () => send({ type: 'captions', on: !state.captions?.on }));
  $('captions-smaller').addEventListener('click', () => setCaptionSize(-1));
  $('captions-larger').addEventListener('click', () => setCaptionSize(1));
  setCaptionSize(0);
  $('start').addEventListener('click', join);
  $('mic').addEventListener('click', () => toggle('mic'));
  $('cam').addEventListener('click', () => toggle('cam'));
  $('leave').addEventListener('click', () => leave());
  $('again').addEventListener('click', () => location.reload());
  new ResizeObserver(() => reportSizes()).observe($('remote'));

  state.token = new URLSearchParams(location.search).get('token');
  state.claims = state.token ? decodeClaims(state.token) : null;
  if (!state.claims) {
    show('start');
    devForm();
    return;
  }
  if (state.claims.exp && state.claims.exp * 1000 < Date.now()) return end('error.expired');
  if (state.claims.role === 'official') {
    $('prejoin-text').dataset.t = 'prejoin.official';
    $('prejoin-text').textContent = t('prejoin.official');
  }
  show('prejoin');
}

window.balie = { state, currentLang };
main();
