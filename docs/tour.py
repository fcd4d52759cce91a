# %% [markdown]
# # A tour of Diffusion-101
#
# This tour runs the package's own code on the checkpoint that ships with it, one idea at a
# time, each with a picture. It is a script (`python docs/tour.py` writes every figure into
# `docs/tour/`) and a notebook (`docs/tour.ipynb`, made from this file by jupytext); the text
# with its figures reads in `docs/TOUR.md`. On two CPU cores it runs in about two minutes.
#
# After editing this file: `jupytext --to ipynb docs/tour.py` remakes the notebook, and
# `tests/test_tour.py` (its `markdown_page()`) says what docs/TOUR.md must hold.

# %%
import os
import tempfile
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import diffusion101 as d
from diffusion101.config import DiffusionConfig
from diffusion101.presets import get_preset
from diffusion101.dataset import ImageData, load_mnist
from diffusion101.denoise import make_sampler, predict
from diffusion101.diffusion import NoiseSchedule
from diffusion101.evaluate import score
from diffusion101.dit import patchify, unpatchify
from diffusion101.model_files import (BOLD_LORA_PATH, DIT_PATH, FLOW_PATH, ONESTEP_PATH, SHIPPED_PATH,
                                      STUDENT_PATH)
from diffusion101.train_run import train
from diffusion101.unet import UNet

# DIFFUSION101_TOUR_QUICK=1 runs every cell on less work (the test suite does): the figures
# are all written, with fewer digits and steps in them.
QUICK = os.environ.get("DIFFUSION101_TOUR_QUICK") == "1"
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
FIGURES = Path(os.environ.get("DIFFUSION101_TOUR_OUT", HERE / "tour"))
FIGURES.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)


def save(fig, name: str) -> None:
    """Write the figure to docs/tour/<name>.png; in a notebook, show it too."""
    fig.savefig(FIGURES / f"{name}.png", dpi=90, bbox_inches="tight")
    if "inline" in matplotlib.get_backend():
        plt.show()
    else:
        plt.close(fig)


def show_row(axes, images, titles=None):
    """One image per axis, grey on black, no ticks."""
    for i, ax in enumerate(axes):
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)


# The shipped checkpoint: DDPM with noise prediction (d.load() alone gives its few-step
# student, chapter 10).
model = d.load(SHIPPED_PATH)
print(model.config.sample)

# %% [markdown]
# ## 1. The forward process: noise, added in closed form
#
# Training never runs a chain of noising steps. For any timestep t it jumps straight to
# `x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps`, where `ab_t` ("alpha bar") is the product of
# `1 - beta` up to t. Below, one test digit at seven timesteps under the two schedules this
# package knows: the linear one of the DDPM paper (the reference's) and the cosine one of
# Nichol and Dhariwal. Under the linear schedule the digit is gone well before t = 999; the
# cosine schedule destroys it more evenly over the whole range.
#
# ![the forward process under both schedules](tour/forward.png)

# %%
digit = load_mnist(train=False, img_size=28).batch(torch.arange(1))[0]  # (1, 1, 28, 28) in [-1, 1]
steps = [0, 50, 100, 250, 500, 750, 999]
noise = torch.randn(digit.shape, generator=torch.Generator().manual_seed(0))
fig, axes = plt.subplots(2, len(steps), figsize=(len(steps) * 1.2, 2.8))
for row, schedule_name in enumerate(("linear", "cosine")):
    schedule = NoiseSchedule(DiffusionConfig(schedule=schedule_name))
    noisy = [schedule.add_noise(digit, noise, torch.tensor([t]))[0, 0] for t in steps]
    show_row(axes[row], [((x + 1) / 2).clamp(0, 1) for x in noisy],
             [f"{schedule_name} t={t}" for t in steps])
save(fig, "forward")

# %% [markdown]
# ## 2. The schedules side by side
#
# The signal left at step t is `sqrt(ab_t)`; the log signal-to-noise ratio
# `log(ab_t / (1 - ab_t))` says how much of the picture can still be told from the noise. The
# linear schedule spends its last few hundred steps where almost nothing is left, which for a
# 28-pixel image is wasted training; the cosine schedule keeps the log-SNR falling at an even
# pace, so every timestep still has something to learn.
#
# ![alpha bar and log-SNR against t](tour/schedules.png)

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
for schedule_name in ("linear", "cosine"):
    ab = NoiseSchedule(DiffusionConfig(schedule=schedule_name)).alpha_bar
    left.plot(ab.numpy(), label=schedule_name)
    right.plot(torch.log(ab / (1 - ab)).numpy(), label=schedule_name)
left.set(xlabel="t", ylabel="alpha bar", title="signal left")
right.set(xlabel="t", ylabel="log SNR", title="log signal-to-noise ratio")
left.legend()
save(fig, "schedules")

# %% [markdown]
# ## 3. The reverse walk, and what the network believes at each step
#
# Sampling starts from pure noise and asks the network, at every step, for its prediction; the
# sampler turns that into the next, slightly cleaner `x_t`. Every sampler's `step` also returns
# `pred_original_sample`: the clean digit the network sees in the noise at that moment. The loop
# below is the package's own sampling loop written out (set the timesteps, `predict` with
# guidance, step): each digit's upper row shows `x_t`, its lower row the predicted `x_0`. The
# prediction settles on a digit long before the noise is gone; the rest of the walk refines it.
#
# ![x_t and the predicted x_0 during DPM-Solver++](tour/reverse_walk.png)

# %%
sample_cfg = model.config.sample  # DPM-Solver++, 20 steps, guidance 1.75
sampler = make_sampler(sample_cfg, model.config.diffusion)
labels = torch.tensor([0, 3, 7, 9])
generator = torch.Generator().manual_seed(0)
x = torch.randn((len(labels), 1, 28, 28), generator=generator)
sampler.set_timesteps(sample_cfg.steps)
walk = []
with torch.no_grad():
    for t in sampler.timesteps.tolist():
        out = predict(model.net, sampler, x, t, labels, sample_cfg)
        result = sampler.step(out, t, x, generator=generator)
        walk.append((t, x, result.pred_original_sample))
        x = result.prev_sample
shown = [0, 3, 6, 9, 12, 15, 19]
fig, axes = plt.subplots(2 * len(labels), len(shown), figsize=(len(shown) * 1.1, 2.2 * len(labels)))
for col, i in enumerate(shown):
    t, x_t, x0_hat = walk[i]
    for r in range(len(labels)):
        show_row([axes[2 * r, col]], [((x_t[r, 0] + 1) / 2).clamp(0, 1)],
                 [f"t = {t}"] if r == 0 else None)
        show_row([axes[2 * r + 1, col]], [((x0_hat[r, 0] + 1) / 2).clamp(0, 1)])
for r in range(len(labels)):
    axes[2 * r, 0].set_ylabel("x_t", rotation=0, labelpad=14)
    axes[2 * r + 1, 0].set_ylabel("pred.\nx_0", rotation=0, labelpad=14)
save(fig, "reverse_walk")

# %% [markdown]
# ## 4. Samplers: the same network, fewer steps
#
# DDPM takes all 1000 steps and adds fresh noise at each. DDIM follows the same model on any
# subsequence of timesteps without that noise, and DPM-Solver++ (a second-order solver of the
# same ODE) gets there in 20 or even 10. Same seed, same network; each row's title gives its
# time for the whole grid here.
#
# ![the same seeds with four samplers](tour/samplers.png)

# %%
samplers = [("ddpm", 1000), ("ddim", 50), ("dpm", 20), ("dpm", 10)]
if QUICK:
    samplers[0] = ("ddim", 25)
fig, axes = plt.subplots(len(samplers), 10, figsize=(10, 1.3 * len(samplers)))
for row, (name, n_steps) in enumerate(samplers):
    start = time.perf_counter()
    images = d.sample(model, classes=range(10), seed=0, sampler=name, steps=n_steps)
    seconds = time.perf_counter() - start
    show_row(axes[row], images)
    axes[row, 0].set_ylabel(f"{name} {n_steps}\n{seconds:.1f} s", fontsize=8, rotation=0,
                            labelpad=30)
save(fig, "samplers")

# %% [markdown]
# ## 5. Guidance: trading variety for the right digit
#
# The network was trained with the label dropped to a "null" label one time in ten, so it can
# also predict without a label. Classifier-free guidance runs both and pushes away from the
# unconditional prediction: `uncond + w (cond - uncond)`. w = 0 is the unconditional model
# (any digit), w = 1 the plain conditional one; larger w makes the shipped classifier read the
# asked-for digit more often, and thickens the strokes (more ink), at the cost of variety.
#
# ![the same seeds at six guidance scales](tour/guidance.png)

# %%
scales = [0.0, 1.0, 1.5, 2.0, 3.0, 5.0]
per_digit = 1 if QUICK else 10  # digits 0-9 this many times: the accuracy is over ten times that
fig, axes = plt.subplots(len(scales), 10, figsize=(10, 1.3 * len(scales)))
for row, w in enumerate(scales):
    images = d.sample(model, classes=range(10), n=per_digit, seed=0, guidance=w)
    asked = torch.arange(10).repeat(per_digit)
    accuracy = score(images[:, None] * 2 - 1, asked)["accuracy"]
    show_row(axes[row], images[:10])
    axes[row, 0].set_ylabel(f"w = {w:g}\n{100 * accuracy:.0f}% right\nink {images.mean():.3f}",
                            fontsize=8, rotation=0, labelpad=36)
save(fig, "guidance")

# %% [markdown]
# ## 6. Cross-attention: where the pixels look
#
# The label reaches the network through cross-attention: every pixel is a query, and the
# label's tokens (four per digit in this checkpoint) give the keys and values. The maps show,
# for the encoder's second level (14 x 14 pixels), how each pixel of a half-denoised image
# splits its attention over the four tokens: each pixel's weights sum to 1, and where a pixel
# sits decides which token it reads. (At full resolution this checkpoint's pixels split their
# attention almost evenly: the label matters more where the features are coarse.) With one
# token per label, as in the reference design, the softmax runs over a single key and is
# exactly 1 everywhere: the attention then adds the same label vector at every pixel, and its
# queries and keys do nothing.
#
# ![attention weights per label token](tour/attention.png)

# %%
block = model.net.enc_convs[1].crossattn  # the encoder's second level, 14 x 14
captured = {}
hook = block.register_forward_hook(lambda module, inputs, output: captured.update(
    features=inputs[0], context=inputs[1]))
labels = torch.tensor([1, 4, 8])
t, x_t, _ = walk[10]  # halfway through the walk of section 3
with torch.no_grad():
    model.net(x_t[:3], torch.full((3,), t), labels)
hook.remove()
b, c, h, w = captured["features"].shape
pixels = captured["features"].permute(0, 2, 3, 1).reshape(b, h * w, c)  # one token per pixel
with torch.no_grad():
    weights = block.attention(pixels, captured["context"])  # (3, 784, 4)
    one_token = block.attention(pixels, captured["context"][:, :1])  # a single key
print("with one token, every weight is", one_token.unique().tolist())
maps = weights.transpose(1, 2).reshape(b, -1, h, w)  # (3, tokens, 28, 28)
fig, axes = plt.subplots(b, 1 + maps.shape[1], figsize=(1.6 * (1 + maps.shape[1]), 1.7 * b))
for r in range(b):
    show_row([axes[r, 0]], [((x_t[r, 0] + 1) / 2).clamp(0, 1)], [f"label {labels[r].item()}, x_t"])
    for k in range(maps.shape[1]):
        axes[r, k + 1].imshow(maps[r, k], cmap="viridis", vmin=0, vmax=1)
        axes[r, k + 1].set_xticks([])
        axes[r, k + 1].set_yticks([])
        axes[r, k + 1].set_title(f"token {k}", fontsize=8)
save(fig, "attention")

# %% [markdown]
# ## 7. LoRA: a new style from a few thousand parameters
#
# The adapter shipped beside the checkpoint was trained on bold MNIST (strokes thickened by a
# 3x3 max filter) for 200 steps, with the base frozen: each adapted layer learns a rank-8 update
# `x A B alpha / r` to its weight, 102 KB in all. Same seeds, base above, base + adapter below;
# `d.load(loras=[(path, strength)])` merges it into the weights.
#
# ![the base and the base with the bold adapter](tour/lora.png)

# %%
bold = d.load(SHIPPED_PATH, loras=[BOLD_LORA_PATH])
fig, axes = plt.subplots(2, 10, figsize=(10, 2.4))
show_row(axes[0], d.sample(model, seed=1))
show_row(axes[1], d.sample(bold, seed=1))
axes[0, 0].set_ylabel("base", rotation=0, labelpad=20)
axes[1, 0].set_ylabel("+ LoRA", rotation=0, labelpad=20)
save(fig, "lora")

# %% [markdown]
# ## 8. Training, in a few hundred steps
#
# The loop that trains every preset, here on the `tiny` preset (16 px, 100 timesteps, a
# few thousand parameters) and a slice of MNIST: `train()` runs `fit()`, which, for each epoch
# and each batch, makes one optimizer step, logs the loss to TensorBoard, and saves. The loss
# falls fast, and the samples go from noise to smooth blobs of about a digit's ink; digits take a
# bigger network and more steps (the shipped checkpoint: sixty times the parameters, ten times
# the steps, on all of MNIST).
#
# ![the tiny preset's loss, and its digits before and after](tour/training.png)

# %%
cfg = get_preset("tiny")
cfg.train.epochs, cfg.train.max_steps = 2, (40 if QUICK else 600)
mnist = load_mnist(train=True, img_size=16)
data = ImageData(mnist.images[:8000], mnist.labels[:8000])
work = Path(tempfile.mkdtemp())
torch.manual_seed(cfg.train.seed)
untrained = d.Pipeline(UNet(cfg.model).eval(), cfg, torch.device("cpu"))  # train()'s first weights
start = time.perf_counter()
train(cfg, "tiny", work / "tiny.pt", work / "runs", "cpu", data=data, log=lambda *a: None)
minutes = (time.perf_counter() - start) / 60
events = EventAccumulator(str(work / "runs"))
events.Reload()
losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
trained = d.load(work / "tiny.pt")
fig = plt.figure(figsize=(13, 3))
layout = fig.add_gridspec(2, 15)
curve = fig.add_subplot(layout[:, :4])
curve.plot(*zip(*losses))
curve.set(xlabel="step", ylabel="L1 loss on the noise",
          title=f"tiny preset, {cfg.train.max_steps} steps ({minutes:.1f} min here)")
for row, (name, m) in enumerate((("before", untrained), ("after", trained))):
    axes = [fig.add_subplot(layout[row, 5 + k]) for k in range(10)]
    show_row(axes, d.sample(m, seed=0))
    axes[0].set_ylabel(name, rotation=0, labelpad=18, fontsize=8)
save(fig, "training")

# %% [markdown]
# ## 9. Flow matching beside DDPM: one digit, two walks
#
# Since 2023 the field trains with flow matching (Stable Diffusion 3, Flux): the noisy image is
# a straight mix of data and noise, `x_t = (1 - t) x_0 + t eps` with t from 0 (data) to 1
# (noise), and the network learns the velocity `eps - x_0` of that line. Sampling solves the
# ODE back along it with Euler or Heun steps (`diffusion101/flow.py`). The package ships a
# flow model beside the DDPM one: the same network, trained by the `cpu` preset (1,200
# training steps, where the DDPM checkpoint had 6,000). Below, one seed and one digit walked by
# each: DDPM's DPM-Solver++ over 20 steps and flow matching's Heun over 8 (15 network calls),
# `x_t` above the predicted `x_0`. The flow's prediction is a digit from its first step on:
# on a straight path the first velocity already points at the data.
#
# ![one digit walked by DDPM and by flow matching](tour/flow_walks.png)

# %%
flow = d.load(FLOW_PATH)


def walk_of(m, label: int, seed: int) -> list:
    """(t, x_t, predicted x_0) at every step of m's own sampler, for one image."""
    sc = m.config.sample
    s = make_sampler(sc, m.config.diffusion)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 1, 28, 28), generator=g)
    steps = []
    with torch.no_grad():
        for t in s.timesteps.tolist():
            result = s.step(predict(m.net, s, x, t, torch.tensor([label]), sc), t, x, generator=g)
            steps.append((t, x, result.pred_original_sample))
            x = result.prev_sample
    return steps + [(0, x, x)]


fig, axes = plt.subplots(4, 7, figsize=(7.7, 4.8))
for row, (name, m) in enumerate((("DDPM", model), ("flow", flow))):
    steps = walk_of(m, 3, seed=1)
    picks = [round(i * (len(steps) - 1) / 6) for i in range(7)]
    for col, i in enumerate(picks):
        t, x_t, x0_hat = steps[i]
        label = f"t = {t:.2f}" if name == "flow" else f"t = {t}"
        show_row([axes[2 * row, col]], [((x_t[0, 0] + 1) / 2).clamp(0, 1)], [label])
        show_row([axes[2 * row + 1, col]], [((x0_hat[0, 0] + 1) / 2).clamp(0, 1)])
    axes[2 * row, 0].set_ylabel(f"{name}\nx_t", rotation=0, labelpad=22)
    axes[2 * row + 1, 0].set_ylabel("pred.\nx_0", rotation=0, labelpad=22)
save(fig, "flow_walks")

# %% [markdown]
# Quality against steps: the same seeds, each model with its own sampler at 1, 2, 4 and 8 steps
# (DPM-Solver++; Euler, one network call a step). DDPM's solver needs its steps; the flow
# model draws digits in far fewer, since its paths are close to straight. docs/EXPERIMENTS.md
# has the accuracy and FID of both over 1 to 32 steps.
#
# ![digits 0-9 at 1, 2, 4 and 8 steps, DDPM and flow](tour/flow_steps.png)

# %%
counts = [1, 2, 4, 8]
fig, axes = plt.subplots(2 * len(counts), 10, figsize=(10, 2.6 * len(counts)))
for i, n_steps in enumerate(counts):
    for j, (name, m, sampler_name) in enumerate((("DDPM", model, "dpm"), ("flow", flow, "euler"))):
        images = d.sample(m, classes=range(10), seed=0, sampler=sampler_name, steps=n_steps)
        show_row(axes[2 * i + j], images)
        axes[2 * i + j, 0].set_ylabel(f"{name}\n{n_steps} step{'s' if n_steps > 1 else ''}",
                                      fontsize=8, rotation=0, labelpad=28)
save(fig, "flow_steps")


# %% [markdown]
# ## 10. Distillation: a student that jumps where its teacher walks
#
# The shipped checkpoint walks 20 DPM-Solver++ steps, two network calls each with guidance.
# Its paths curve: at a noisy `x_t` many digits are still possible, the network's answer is
# their average, and one big step along that average lands between them, on a blur (the 1-
# and 2-step rows of chapter 4). `diffusion101-distill` makes a student that never has to
# average. The teacher first walks 10,000 noises to its digits, guidance included; the
# student, a copy of its network, then learns flow matching on those pairs. Each noise is tied
# to one digit, so the path between them is a straight line, and one Euler step along it lands
# on the digit (rectified flow's distillation, Liu et al. 2023). It trains at the times its
# walk of 4 steps visits, so it walks 1, 2 or 4 steps, one network call each, the guidance
# built in. Below, from the same seed: the teacher at 20 steps and at 4, the student at 1, 2
# and 4, each row with the seconds it took here.
#
# ![the teacher at 20 and 4 steps beside the student at 1, 2 and 4](tour/student_steps.png)

# %%
student = d.load(STUDENT_PATH)
print(student.config.sample)
rows = [("teacher", model, 20), ("teacher", model, 4)]
rows += [("student", student, n_steps) for n_steps in (1, 2, 4)]
fig, axes = plt.subplots(len(rows), 10, figsize=(10, 1.4 * len(rows)))
for axes_row, (name, m, n_steps) in zip(axes, rows):
    start = time.perf_counter()
    images = d.sample(m, classes=range(10), seed=0, steps=n_steps)
    seconds = time.perf_counter() - start
    show_row(axes_row, images)
    axes_row[0].set_ylabel(f"{name}\n{n_steps} step{'s' if n_steps > 1 else ''}\n{seconds:.2f} s",
                           fontsize=8, rotation=0, labelpad=28)
save(fig, "student_steps")


# %% [markdown]
# ## 11. A transformer instead of the UNet: patches in, patches out
#
# Stable Diffusion 3, Flux and most image models since DiT (Peebles and Xie 2023) denoise with a
# transformer rather than a UNet. `diffusion101/dit.py` is one, and the `cpu-dit` preset
# trains it with everything else of the `cpu` recipe unchanged (flow matching, guidance, EMA):
# `model.backbone=dit` is the only switch, because training and sampling ask `networks.py` for
# "the network" and never look inside. The image is cut into patches: at 28 px with 4-px
# patches, a 7 x 7 grid of 49 tokens of 16 numbers each, every token given a fixed position.
# The transformer never sees the image as an image, only these tokens; its output tokens are
# put back in place by the exact inverse of the cut.
#
# ![a digit, its 49 patches pulled apart, and the tokens as the network reads them](tour/dit_patches.png)

# %%
p = 4
patches = patchify(digit, p)  # (1, 49, 16): one row per patch, row-major
assert torch.equal(unpatchify(patches, p, 1), digit)  # put back, bit for bit
fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), gridspec_kw={"width_ratios": [1, 1, 1.3],
                                                               "wspace": 0.3})
axes[0].imshow(digit[0, 0], cmap="gray")
axes[0].set_title("the digit, 28 x 28", fontsize=9)
side = 28 // p
exploded = torch.full((side * (p + 1), side * (p + 1)), 0.0)  # a grey gap around each patch
for i in range(side):
    for j in range(side):
        exploded[i * (p + 1):i * (p + 1) + p, j * (p + 1):j * (p + 1) + p] = \
            digit[0, 0, i * p:(i + 1) * p, j * p:(j + 1) * p]
axes[1].imshow(exploded, cmap="gray")
axes[1].set_title(f"{side * side} patches of {p} x {p}", fontsize=9)
axes[2].imshow(patches[0].T, cmap="gray", aspect="auto")
axes[2].set_title("the tokens: one column per patch", fontsize=9)
axes[2].set_xlabel("patch (token)")
axes[2].set_ylabel("pixel in the patch")
for ax in axes[:2]:
    ax.set_xticks([])
    ax.set_yticks([])
save(fig, "dit_patches")

# %% [markdown]
# The timestep reaches every block through adaLN-Zero: it sets a shift, a scale and a gate for
# the block's attention and its MLP, and the gates start at zero, so a new block is the
# identity and training switches each one on. The label is four learned tokens that join the
# 49 patch tokens in one self-attention (joint attention, Stable Diffusion 3's idea with one
# set of weights): each patch's softmax weighs the label against the other patches, so, unlike
# the UNet's cross-attention (chapter 6), a patch can choose not to listen to the label.
# Below, the shipped `cpu-dit` model (`weights/cpu_dit.safetensors`) denoises a 3 halfway
# (t = 0.5); each map is one block, each square one patch, its brightness the share of that
# patch's attention that goes to the label tokens (the rest goes to other patches). This
# model listens to the label mostly in its first block, where the patches of the stroke attend
# to it most; later blocks attend almost only to other patches, shaping the digit the first
# block chose.
#
# ![the share of each patch's attention that goes to the label, block by block](tour/dit_attention.png)

# %%
dit = d.load(DIT_PATH)
print(dit.config.model)
g = torch.Generator().manual_seed(0)
three = load_mnist(train=False, img_size=28)
x0_three = three.batch(torch.nonzero(three.labels == 3)[:1, 0])[0]
t_half = torch.tensor([0.5])
x_half = 0.5 * x0_three + 0.5 * torch.randn(x0_three.shape, generator=g)
net_t = t_half * (dit.config.diffusion.timesteps - 1)  # as FlowMatching.net_time feeds it
share = dit.net.attention_to_label(x_half, net_t, torch.tensor([3]))[0]  # (blocks, 49)
blocks = share.shape[0]
fig, axes = plt.subplots(1, blocks + 1, figsize=(1.4 * (blocks + 1), 1.9))
axes[0].imshow(x_half[0, 0], cmap="gray")
axes[0].set_title("x_t, t = 0.5", fontsize=8)
for b in range(blocks):
    axes[b + 1].imshow(share[b].view(side, side), cmap="magma", vmin=0, vmax=float(share.max()))
    axes[b + 1].set_title(f"block {b + 1}\nmean {share[b].mean():.2f}", fontsize=8)
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
save(fig, "dit_attention")
print("share of attention on the label, per block:", [round(float(v), 3) for v in share.mean(1)])

# %% [markdown]
# At this scale the UNet wins. Trained 1,200 steps each in about the same CPU minutes, the
# UNet draws the digit asked for 99.75% of the time at FID 1.58 (guidance 1.75); the
# transformer needs guidance near 3 to reach 99.5% (99.65% at 3, FID 2.24). A convolution
# knows from the start that neighbouring pixels belong together; the transformer has to learn
# it from data, and transformers are known to overtake convolutions only with more compute.
# One choice mattered a lot: the `cpu-dit` network predicts the clean image `x_0`, not the
# velocity (Li and He 2025), which at guidance 2 halved its FID (3.78 to 1.93). The side-by-side
# tables, and where the two curves would cross: docs/EXPERIMENTS.md, "A transformer beside the
# UNet".


# %% [markdown]
# ## 12. One step from scratch: the average velocity
#
# The student of chapter 10 draws in one step, but it needs a teacher (an hour of CPU here) and
# the teacher's walks. MeanFlow (Geng et al. 2025; `diffusion101/meanflow.py`) trains a one-step
# generator from scratch. Flow matching's network learns the *instantaneous* velocity
# `v(x_t, t)`: the direction of the path at one point. Where several images are still possible,
# that direction points at their average, so the path of `x_t` curves as the choice is made,
# and one step along the first direction lands between the images. MeanFlow's network learns
# the *average* velocity over an interval, `u(x_t, r, t) = (x_t - x_r) / (t - r)`, which is
# exact for a jump of any length: `x_r = x_t - (t - r) u`. It never needs the path to learn it:
# differentiating `(t - r) u` along the path gives `u = v - (t - r) du/dt`, and the right side
# asks only for the velocity of the straight line and the network's own derivative, taken by a
# Jacobian-vector product. The network takes the interval `t - r` as a second time input.
#
# Below, a 2-D example where everything is exact: the data are two points, the noise a
# Gaussian, and the path from one noise (top) curves towards the point it ends at. At five
# times along it, the instantaneous velocity (orange) and the average velocity to the end
# (blue), each drawn as the jump of length t it asks for: the orange jumps land between the
# two points, the blue ones on the data.
#
# ![the instantaneous and the average velocity along one curved path](tour/meanflow_paths.png)

# %%
ends = torch.tensor([[-1.0, -0.6], [1.0, -0.6]])  # the data: two points, equally likely


def velocity_2d(x: torch.Tensor, t: float) -> torch.Tensor:
    """The exact flow-matching velocity of the two-point data at (x, t): the velocity of
    each point's straight line, eps - x_0 = (x - x_0) / t, weighted by how likely that point
    is given x (a Gaussian of spread t around (1 - t) x_0)."""
    logits = -((x[None] - (1 - t) * ends).square().sum(1)) / (2 * t ** 2)
    weights = torch.softmax(logits, dim=0)
    return (weights[:, None] * (x[None] - ends) / t).sum(0)


x_path, times = [torch.tensor([0.25, 1.6])], torch.linspace(1.0, 0.0, 2001)
for t_now, t_next in zip(times[:-1].tolist(), times[1:].tolist()):  # small Euler steps: the path
    x_path.append(x_path[-1] + (t_next - t_now) * velocity_2d(x_path[-1], t_now))
path = torch.stack(x_path)
fig, ax = plt.subplots(figsize=(5.2, 4.4))
ax.plot(path[:, 0], path[:, 1], color="grey", lw=1.5, label="the path of x_t")
ax.scatter(ends[:, 0], ends[:, 1], s=60, color="black", zorder=3, label="the data")
for k, i in enumerate((0, 400, 800, 1200, 1600)):
    t_i, x_i = times[i].item(), path[i]
    jump_v = -t_i * velocity_2d(x_i, t_i)  # to t = 0 along the instantaneous velocity
    jump_u = path[-1] - x_i  # t times the average velocity u(x_t, 0, t)
    ax.annotate("", x_i + jump_v, x_i, arrowprops={"arrowstyle": "->", "color": "tab:orange"})
    ax.annotate("", x_i + jump_u, x_i, arrowprops={"arrowstyle": "->", "color": "tab:blue"})
    ax.text(x_i[0] + 0.06, x_i[1], f"t = {t_i:.1f}", fontsize=7)
ax.plot([], [], color="tab:orange", label="t v(x_t, t): one Euler jump")
ax.plot([], [], color="tab:blue", label="t u(x_t, 0, t): one MeanFlow jump")
ax.legend(fontsize=7, loc="upper left")
ax.set_aspect("equal")
save(fig, "meanflow_paths")

# %% [markdown]
# The `cpu-onestep` preset trains this on MNIST: the `cpu` recipe's UNet with GroupNorm (forward-
# mode derivatives must stay within each image, and BatchNorm mixes a batch) and the interval
# input, guidance trained into the target so that a guided step is one network call, 1,100
# training steps. The shipped model (`weights/cpu_onestep.safetensors`) draws below in one and
# two jumps, beside the distilled student in as many steps (the student's row: a teacher's hour
# and a distillation's 25 minutes; MeanFlow's: its own training alone). docs/EXPERIMENTS.md,
# "One step from scratch", has the accuracy and FID of each, and the CPU minutes of each path.
#
# ![digits 0-9 in one and two steps: the from-scratch MeanFlow model and the distilled student](tour/onestep_grid.png)

# %%
onestep = d.load(ONESTEP_PATH)
print(onestep.config.diffusion)
rows = [(name, m, n_steps) for n_steps in (1, 2) for name, m in (("MeanFlow", onestep),
                                                                  ("student", student))]
fig, axes = plt.subplots(len(rows), 10, figsize=(10, 1.4 * len(rows)))
for axes_row, (name, m, n_steps) in zip(axes, rows):
    images = d.sample(m, classes=range(10), seed=0, steps=n_steps)
    show_row(axes_row, images)
    axes_row[0].set_ylabel(f"{name}\n{n_steps} step{'s' if n_steps > 1 else ''}", fontsize=8,
                           rotation=0, labelpad=28)
save(fig, "onestep_grid")


# %% [markdown]
# ## Where next
#
# - `diffusion101-train --preset cpu` trains today's `cpu` recipe (flow matching) in about a
#   quarter of an hour; `tensorboard --logdir runs` shows it learn. `--preset cpu-ddpm` trains
#   the DDPM recipe; `diffusion101-distill --teacher model.pt` makes a few-step student of
#   either.
# - `docs/USAGE.md` lists every option; `docs/EXPERIMENTS.md` says what each choice of the
#   `cpu` preset bought, measured.
