// The page's walk: flow.py's Euler sampler and denoise.py's classifier-free guidance, written
// again in JavaScript over the exported ONNX graphs (models/*.onnx, described by
// models/models.json). The network is the only thing onnxruntime runs; the walk is the loop
// below, as short as its Python twin.

const $ = (id) => document.getElementById(id);
const timings = { runs: 0 };  // read by the browser test and benchmarks/web_speed.py
window.d101 = { timings, ready: false, busy: false, error: null };

function fail(sentence) {
  // One sentence on the page, for a person; the same in window.d101.error, for the tests.
  $('status').textContent = sentence;
  $('status').className = 'error';
  window.d101.error = sentence;
}

// A seeded source of N(0, 1) numbers (mulberry32, then Box-Muller): the page's x_T. Each image
// has its own, seeded by (seed, label), so a digit drawn alone matches its column of the grid.
function gaussian(seed) {
  let a = seed >>> 0;
  const uniform = () => {
    a = (a + 0x6D2B79F5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return (((t ^ (t >>> 14)) >>> 0) + 0.5) / 4294967296;  // in (0, 1), never 0
  };
  return () => Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform());
}

export function startNoise(meta, labels, seed) {
  const size = meta.channels * meta.img_size * meta.img_size;
  const x = new Float32Array(labels.length * size);
  labels.forEach((label, i) => {
    const draw = gaussian(seed * 1009 + label * 7919 + 1);
    for (let k = 0; k < size; k++) x[i * size + k] = draw();
  });
  return x;
}

// SD3's time shift on a uniform grid from t = 1 (noise) to t = 0 (data), as flow.shifted.
export function timeGrid(steps, shift) {
  return Array.from({ length: steps + 1 }, (_, i) => {
    const t = 1 - i / steps;
    return shift * t / (1 + (shift - 1) * t);
  });
}

// The network's output at time t for the batch x: once with the labels, or (w != 1) once
// with the labels and once with the null label in one batch, mixed as uncond + w (cond - uncond).
async function predict(net, x, t, labels, w) {
  const meta = net.meta, guided = w !== 1;
  const n = labels.length, batch = guided ? 2 * n : n;
  const shape = [meta.channels, meta.img_size, meta.img_size];
  const xs = guided ? new Float32Array(2 * x.length) : x;
  if (guided) { xs.set(x); xs.set(x, x.length); }
  const ys = new BigInt64Array(batch);
  labels.forEach((label, i) => { ys[i] = BigInt(label); if (guided) ys[n + i] = BigInt(meta.null_label); });
  // the time on the network's scale, rounded as torch rounds it: float32 t times the scale
  const netTime = new Float32Array(batch).fill(Math.fround(t) * meta.time_scale);
  const feeds = {
    x: new net.ort.Tensor('float32', xs, [batch, ...shape]),
    t: new net.ort.Tensor('float32', netTime, [batch]),
    y: new net.ort.Tensor('int64', ys, [batch]),
  };
  const out = (await net.session.run(feeds)).out.data;
  if (!guided) return out;
  const v = new Float32Array(x.length);
  for (let k = 0; k < x.length; k++) v[k] = out[x.length + k] + w * (out[k] - out[x.length + k]);
  return v;
}

// The Euler walk (flow.py's FlowEuler): x <- x + (t_next - t) v, and x0 = x - t v, the image
// the velocity points at. onStep(i, x_t, x0, t, t_next) sees each step as it is taken.
export async function walk(net, labels, { steps, w, seed, start = null, onStep = null }) {
  const meta = net.meta;
  let x = start ?? startNoise(meta, labels, seed);
  const grid = timeGrid(steps, meta.shift);
  for (let i = 0; i < steps; i++) {
    const t = grid[i], dt = grid[i + 1] - t;
    let v = await predict(net, x, t, labels, w);
    if (meta.clip === 'x0' && t > 0) {  // the velocity whose x0 is clipped to [-1, 1]
      const clipped = new Float32Array(x.length);
      for (let k = 0; k < x.length; k++) {
        clipped[k] = (x[k] - Math.min(1, Math.max(-1, x[k] - t * v[k]))) / t;
      }
      v = clipped;
    }
    const next = new Float32Array(x.length), x0 = new Float32Array(x.length);
    for (let k = 0; k < x.length; k++) {
      x0[k] = x[k] - t * v[k];
      next[k] = x[k] + dt * v[k];
      if (meta.clip === 'x_t') next[k] = Math.min(1, Math.max(-1, next[k]));
    }
    x = next;
    if (onStep) await onStep(i, x, x0, t, grid[i + 1]);
  }
  return x;
}

// Images in [-1, 1], side by side, one pixel each: the canvas is scaled up by CSS.
function draw(canvas, meta, images, n) {
  const s = meta.img_size, c = meta.channels, size = c * s * s;
  canvas.width = n * s;
  canvas.height = s;
  const ctx = canvas.getContext('2d');
  const pixels = ctx.createImageData(n * s, s);
  for (let i = 0; i < n; i++) {
    for (let r = 0; r < s; r++) {
      for (let col = 0; col < s; col++) {
        const p = 4 * (r * n * s + i * s + col);
        for (let ch = 0; ch < 3; ch++) {
          const value = images[i * size + (c === 3 ? ch : 0) * s * s + r * s + col];
          pixels.data[p + ch] = Math.round(Math.min(1, Math.max(0, (value + 1) / 2)) * 255);
        }
        pixels.data[p + 3] = 255;
      }
    }
  }
  ctx.putImageData(pixels, 0, 0);
}

function frameRow(i, t, tNext) {
  const row = document.createElement('div');
  row.className = 'frame';
  const label = document.createElement('span');
  label.textContent = `step ${i + 1}: t ${t.toFixed(2)} \u2192 ${tNext.toFixed(2)}`;
  const xt = document.createElement('canvas'), x0 = document.createElement('canvas');
  xt.title = 'x_t after the step';
  x0.title = 'the predicted x_0';
  row.append(label, xt, x0);
  return { row, xt, x0 };
}

const nextPaint = () => new Promise((resolve) => setTimeout(resolve, 0));

async function runPanel(net, panel, labels, steps, w, seed) {
  const frames = $(`${panel}-frames`), meta = net.meta, n = labels.length;
  frames.replaceChildren();
  const began = performance.now();
  const x = await walk(net, labels, {
    steps, w, seed,
    onStep: async (i, xt, x0, t, tNext) => {
      const { row, xt: a, x0: b } = frameRow(i, t, tNext);
      draw(a, meta, xt, n);
      draw(b, meta, x0, n);
      frames.append(row);
      if (timings.firstFrame === undefined) timings.firstFrame = performance.now();
      await nextPaint();  // let the page show this step before the next is computed
    },
  });
  draw($(`${panel}-result`), meta, x, n);
  const ms = performance.now() - began;
  timings[panel] = { ms, steps, n };
  $(`${panel}-time`).textContent = `${n} image${n > 1 ? 's' : ''}, ${steps} step${steps > 1 ? 's' : ''}: ${ms.toFixed(0)} ms`;
}

const state = { labels: [], nets: {}, again: false };
window.d101.nets = state.nets;  // the loaded networks, for the tests' walk against torch's

// Walk both panels (or only the teacher's: its first walk, once it has loaded) for the digits,
// seed and steps chosen now.
async function run(panels = ['student', 'teacher']) {
  if (!window.d101.ready) return;
  if (window.d101.busy) { state.again = true; return; }  // asked while walking: walk once more
  window.d101.busy = true;
  try {
    const seed = Math.max(0, Math.floor(Number($('seed').value) || 0));
    const { student, teacher } = state.nets;
    if (panels.includes('student')) {
      await runPanel(student, 'student', state.labels, Number($('student-steps').value), student.meta.guidance, seed);
    }
    if (!teacher) return;  // still loading: its walk follows once it is
    await runPanel(teacher, 'teacher', state.labels, Number($('teacher-steps').value), Number($('guidance').value), seed);
    timings.runs += 1;
  } catch (e) {
    fail(`A network call failed (${e.message || e}), so the walk stopped.`);
  } finally {
    window.d101.busy = false;
  }
  if (state.again) { state.again = false; await run(); }
}

function options(select, values, chosen) {
  for (const v of values) select.add(new Option(String(v), String(v), false, v === chosen));
}

function controls(names, teacherMeta) {
  const digits = $('digits');
  const choose = (labels, button) => {
    state.labels = labels;
    for (const b of digits.children) b.classList.toggle('chosen', b === button);
    run();
  };
  names.forEach((name, label) => {
    const b = document.createElement('button');
    b.textContent = name;
    b.dataset.label = String(label);
    b.onclick = () => choose([label], b);
    digits.append(b);
  });
  const all = document.createElement('button');
  all.textContent = 'all';
  all.dataset.label = 'all';
  all.onclick = () => choose(names.map((_, i) => i), all);
  digits.append(all);
  all.classList.add('chosen');
  options($('student-steps'), [1, 2, 3, 4], state.nets.student.meta.steps);
  options($('teacher-steps'), [1, 2, 4, 8, 16], 8);
  $('guidance').value = String(teacherMeta.guidance);
  const show = () => { $('guidance-value').textContent = Number($('guidance').value).toFixed(2); };
  show();
  $('guidance').oninput = show;
  for (const id of ['seed', 'student-steps', 'teacher-steps', 'guidance']) $(id).onchange = () => run();
}

async function load(ort, meta) {
  try {
    const session = await ort.InferenceSession.create(`./models/${meta.file}`, { executionProviders: ['wasm'] });
    return { ort, session, meta };
  } catch (e) {
    throw new Error(`The model models/${meta.file} could not be loaded (${e.message || e}), so nothing can be drawn.`);
  }
}

async function main() {
  let ort;
  try {
    ort = await import('./vendor/ort.wasm.min.mjs');
  } catch (e) {
    fail('The ONNX runtime (vendor/ort.wasm.min.mjs) could not be loaded, so nothing can be drawn.');
    return;
  }
  timings.imported = performance.now();
  ort.env.wasm.wasmPaths = new URL('./vendor/', import.meta.url).href;
  // Threads need a cross-origin-isolated page (diffusion101-demo sends the headers; a plain
  // static host does not): one thread otherwise. ?threads=N chooses (benchmarks/web_speed.py).
  const threads = Number(new URLSearchParams(location.search).get('threads'));
  ort.env.wasm.numThreads = threads || (self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1);
  try {
    const response = await fetch('./models/models.json');
    if (!response.ok) throw new Error(`models/models.json: HTTP ${response.status}`);
    const manifest = await response.json();
    // The student first, and its walk before the teacher is loaded: the first digit sooner.
    state.nets.student = await load(ort, manifest.student);
    state.labels = manifest.student.class_names.map((_, i) => i);
    controls(manifest.student.class_names, manifest.teacher);
    timings.ready = performance.now();
    window.d101.ready = true;
    $('status').textContent = 'Loading the teacher...';
    await run();
    state.nets.teacher = await load(ort, manifest.teacher);
  } catch (e) {
    fail(e.message.endsWith('drawn.') ? e.message
      : `The models could not be loaded (${e.message || e}), so nothing can be drawn.`);
    return;
  }
  $('status').textContent = 'Ready: pick a digit, a seed or a number of steps.';
  await run(['teacher']);
}

main();
