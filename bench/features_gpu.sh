#!/usr/bin/env bash
# Feature extraction on one GPU: ResNet-50 (random weights: no network there) at 448 px over 2,000 + 500 rows of
# the 145 CUB JPEGs of tests/data re-encoded at 500 px (a full-size photo's decode cost). Prints end-to-end img/s
# with 4 and 16 workers, the loader alone, and checks bit-equality with the plain backbone;
# then the same end to end with --decode device (nvJPEG + resize on the GPU, the workers only read the files),
# the device decode + resize alone, and the max abs / relative difference of those features to the PIL features
# of the same rows. The Python steps have timeouts; a failing step is reported, not fatal.
# Last, bench/features_steady.py: the backbone alone and the steady-state rate of every source (8,000 rows each,
# warm-up left out).
# SMOKE=1: tiny sizes on the CPU. Run from the repository root: bash bench/features_gpu.sh (PYTHON=python3 if needed).
set -euo pipefail
OUT=${OUT:-/tmp/fgpu_out}; mkdir -p "$OUT"; R=$OUT/root
DEV=${SMOKE:+cpu}; DEV=${DEV:-0}; S=${SMOKE:+64}; S=${S:-448}; NT=${SMOKE:+200}; NT=${NT:-2000}
"${PYTHON:-python}" bench/make_bench_root.py tests/data/cub/CUB_200_2011 "$R" --upscale 500 >/dev/null
"${PYTHON:-python}" - "$R" "$NT" <<'PY'
import sys, numpy as np
root, nt = sys.argv[1] + "/pascal", int(sys.argv[2])
for phase, n in (("train", nt), ("val", nt // 4)):
    for kind in ("images", "labels", "labels_obs"):
        a = np.load(f"{root}/formatted_{phase}_{kind}.npy")
        np.save(f"{root}/formatted_{phase}_{kind}.npy", a[np.arange(n) % len(a)])
PY
for W in 4 16; do
  rm -rf "$R/pascal/features"
  timeout 110 "${PYTHON:-python}" preproc/extract_features.py --dataset pascal --arch resnet50 --weights random --image-size $S \
    --data-root "$R" -g $DEV --num-workers $W 2>&1 | grep -E "rows from|wrote|error" || true
done
timeout 100 "${PYTHON:-python}" - "$R" "$S" "$DEV" <<'PY' || echo "the loader / equality step failed (exit $?)"
import sys, time, torch, numpy as np
from pathlib import Path
from PIL import Image
from torch.utils.data import DataLoader
import image_cache, features
from datasets import get_transforms
root, size, dev = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
device = torch.device("cpu" if dev == "cpu" else f"cuda:{dev}")
model = features._build_backbone("resnet50", "random", 20).eval().to(device)
names = np.load(root / "pascal/formatted_train_images.npy")
jpegs = root / "pascal/VOCdevkit/VOC2012/JPEGImages"
for w in (4, 16):
    t, n = time.time(), 0
    for _, im, _ in DataLoader(image_cache._Decoded(jpegs, names[:1000], size), batch_size=64, num_workers=w):
        n += len(im)
    print(f"loader alone (decode + resize), {w} workers: {n / (time.time() - t):.0f} img/s")
feats = np.load(root / f"pascal/features/resnet50_random_{size}/val_features.npy")
vn = np.load(root / "pascal/formatted_val_images.npy")
tf = get_transforms(size)["val"]
with torch.inference_mode():
    ref = model(torch.stack([tf(Image.open(jpegs / str(n)).convert("RGB")) for n in vn[:64]]).to(device)).cpu()
print("first val batch equal to the plain backbone (torch.equal):", torch.equal(torch.from_numpy(feats[:64]), ref),
      "max abs diff", float((torch.from_numpy(feats[:64]) - ref).abs().max()))
PY
rm -rf "$OUT/pil_features"
cp -r "$R/pascal/features/resnet50_random_$S" "$OUT/pil_features" 2>/dev/null || echo "no PIL features to compare with"
for W in 4 16; do
  rm -rf "$R/pascal/features"
  timeout 110 "${PYTHON:-python}" preproc/extract_features.py --dataset pascal --arch resnet50 --weights random --image-size $S \
    --data-root "$R" -g $DEV --num-workers $W --decode device 2>&1 | grep -E "rows from|wrote|error" \
    | sed "s/^/decode device: /" || true
done
timeout 100 "${PYTHON:-python}" - "$R" "$S" "$DEV" "$OUT/pil_features" <<'PY' \
  || echo "the decode device step failed (exit $?)"
import sys, time, torch, numpy as np
from pathlib import Path
import features
root, size, dev, pil = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
device = torch.device("cpu" if dev == "cpu" else f"cuda:{dev}")
names = np.load(root / "pascal/formatted_train_images.npy")
jpegs = root / "pascal/VOCdevkit/VOC2012/JPEGImages"
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
for w in (4, 16):
    t, n = time.time(), 0
    for _, images, errors in features._device_batches(jpegs, names[:1000], size, 0, 64, w, device):
        assert not any(errors), errors
        n += len(images)
    sync()
    print(f"device decode + resize alone (files read by {w} workers): {n / (time.time() - t):.0f} img/s")
ours = root / f"pascal/features/resnet50_random_{size}"
for phase in ("train", "val"):
    a, b = np.load(ours / f"{phase}_features.npy"), np.load(pil / f"{phase}_features.npy")
    row_rel = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)
    print(f"decode device vs pil, {phase} ({len(a)} rows): max abs diff {np.abs(a - b).max():.3g} (max |pil| "
          f"{np.abs(b).max():.3g}, ratio {np.abs(a - b).max() / np.abs(b).max():.3g}); row-wise relative L2 diff "
          f"max {row_rel.max():.3g}, median {np.median(row_rel):.3g}")
PY
ROWS=${SMOKE:+640}; ROWS=${ROWS:-8000}
timeout 300 "${PYTHON:-python}" bench/features_steady.py "$R" --image-size $S -g $DEV --rows $ROWS \
  || echo "the steady-state step failed (exit $?)"
