"""Multi-site synthetic short-axis cardiac cine-MRI, written as ACDC-style NIfTI.

Real ACDC cannot be shipped, so this generator produces data that behaves like it:

* Anatomy (per patient, in mm): a left ventricle modelled as a truncated half-ellipsoid
  (cavity inside a myocardial shell, so the cavity shrinks and the wall looks thicker
  from base to apex, and the apex is a closed myocardial cap), a crescent right
  ventricle wrapped around the septum that vanishes before the apex, papillary muscles
  and trabeculated (wobbly) endocardium inside the cavity, an open myocardial ring at
  the base (outflow tract), patchy epicardial fat, and the chest around it: body
  outline with subcutaneous fat and chest-wall muscle, ribs, lungs with vessels, liver
  and stomach rising towards the apex, descending aorta and a vertebra.
* Patients vary by ACDC group (NOR, MINF, DCM, HCM, RV: cavity size, wall thickness,
  ejection fraction, RV size), heart position, in-plane rotation, shape and body size,
  and within a site by their own tissue contrast and coil shading (``PatientVariation``
  scales how much a site's patients differ in heart anatomy and in contrast). Each
  patient has labeled end-diastolic (ED) and end-systolic (ES) frames and, optionally
  (``cine``), the whole unlabeled cardiac cycle as a 4D file: the heart contracts
  smoothly from ED to ES and relaxes back.
* Sites (scanners) vary the tissue-to-intensity mapping (per-tissue gains and a gamma),
  the stored intensity range, noise level and type (Gaussian or Rician), a smooth
  multiplicative bias field, ghosting, in-plane blur, in-plane resolution, slice
  count and slice spacing, so the federation is not IID.
* Image formation: tissue intensities with smooth texture, through-slice partial
  volume (each slice averages three sub-slices across its thickness), Gaussian PSF,
  ghosting, bias field, noise; labels are taken at the slice centre.

Everything is vectorised numpy on (layers, H, W) grids; the output is deterministic
for a seed. Label values follow ACDC: 0 background, 1 RV cavity, 2 LV myocardium,
3 LV cavity.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fcl_flower.data.errors import DataError

GENERATOR_VERSION = 3
LABELS = {"0": "background", "1": "RV", "2": "myocardium", "3": "LV"}
GROUPS = ("NOR", "MINF", "DCM", "HCM", "RV")
REFERENCE_FOV_MM = 160.0  # smaller fields of view scale the anatomy down to fit
MAX_PATIENT_VARIATION = 6.0  # 1 - 6 x 0.15 > 0: every tissue gain of _patient_look stays positive
MAX_ANATOMY_VARIATION = 2.0  # every wall and radius stays positive, every heart inside the 128 px field of view

# tissue classes of the anatomical model
AIR, SOFT, FAT, MUSCLE, LUNG, VESSEL, LIVER, STOMACH, AORTA, BONE, MARROW = range(11)
PERI_FAT, MYO, LV_BLOOD, RV_BLOOD, RV_WALL, PAPILLARY, OUTFLOW = range(11, 18)
TISSUES = (
    "air", "soft", "fat", "muscle", "lung", "vessel", "liver", "stomach", "aorta", "bone",
    "marrow", "pericardial_fat", "myocardium", "lv_blood", "rv_blood", "rv_wall", "papillary",
    "outflow",
)
# bSSFP-like base intensities on a 0..1 scale: blood and fat bright, muscle dark grey,
# lungs and air dark. Myocardium, chest-wall muscle, RV wall and soft tissue overlap.
BASE_INTENSITY = np.array(
    [0.0, 0.30, 0.92, 0.21, 0.05, 0.55, 0.40, 0.50, 0.70, 0.08,
     0.50, 0.88, 0.24, 0.80, 0.76, 0.26, 0.27, 0.78],
    dtype=np.float64,
)

# material of each tissue (air, soft, fat, muscle, lung, blood, liver, bone, stomach):
# a site's intensity mapping scales materials, so all blood pools stay alike.
MATERIAL = np.array([0, 1, 2, 3, 4, 5, 6, 8, 5, 7, 2, 2, 3, 5, 5, 3, 3, 5])


@dataclass(frozen=True)
class PatientVariation:
    """How much the patients of one site differ from each other; 1 keeps the generator's ranges.

    ``look`` scales the spread of a patient's own contrast and coil shading (``_patient_look``;
    0 to ``MAX_PATIENT_VARIATION``), ``anatomy`` that of the heart's size, wall thickness,
    shape and in-plane rotation (``_patient_params``; 0 to ``MAX_ANATOMY_VARIATION``). The
    heart's position is left as drawn: scanner operators centre the heart, and a wider
    spread would push some hearts out of the field of view.
    Each scales how far a draw lies from the middle of its range, so the random draws, and
    what neither touches (scanners, the chest around the heart, noise), are the same at
    every value, and 1 reproduces the default dataset bit for bit.
    """

    look: float = 1.0
    anatomy: float = 1.0

    @classmethod
    def of(cls, synthetic) -> "PatientVariation":
        """From the ``synthetic`` config section (keys ``patient_variation``, ``anatomy_variation``)."""
        return cls(look=float(synthetic.patient_variation), anatomy=float(synthetic.anatomy_variation))

    def problem(self) -> str | None:
        """Why these values cannot be generated, naming the config key; None when they can."""
        for key, value, most in (("synthetic.patient_variation", self.look, MAX_PATIENT_VARIATION),
                                 ("synthetic.anatomy_variation", self.anatomy, MAX_ANATOMY_VARIATION)):
            if not 0.0 <= value <= most:
                return f"{key} must be in [0, {most:g}], got {value}"
        return None

    def cache_suffix(self) -> str:
        """Part of the built-in data's cache folder name: empty for the default variation."""
        return (("" if self.look == 1.0 else f"_pv{self.look:g}")
                + ("" if self.anatomy == 1.0 else f"_av{self.anatomy:g}"))


@dataclass(frozen=True)
class SiteParams:
    """Scanner of one site: geometry, contrast and noise. Stored in the manifest."""

    name: str
    spacing_xy: float          # in-plane mm
    slices: int                # typical slice count (patients vary by +-1)
    slice_spacing: float       # mm between slice centres
    slice_thickness: float     # mm, partial volume across the slice
    intensity_max: float       # stored value of intensity 1.0
    gamma: float               # contrast curve applied to the 0..1 intensities
    tissue_gain: tuple[float, ...]  # per-tissue multiplicative gains, order of TISSUES
    noise_type: str            # gaussian | rician
    noise_std: float           # relative to intensity 1.0
    bias_coeffs: tuple[float, ...]  # x, y, xy, x^2, y^2, z of the log bias field
    psf_sigma_px: float        # in-plane Gaussian blur
    ghost_amplitude: float     # phase-encode ghost (motion) strength
    texture_amplitude: float   # smooth multiplicative tissue texture


def _site_params(seed: int, index: int, n_sites: int, spacing: float) -> SiteParams:
    rng = np.random.default_rng([seed, 0x517E, index])
    strata = np.random.default_rng([seed, 0x517E]).permutation(np.arange(8, 13))
    slices = int(np.resize(strata, n_sites)[index])  # the first 5 sites differ in slice count
    coverage = rng.uniform(72.0, 90.0)
    slice_spacing = float(np.clip(coverage / (slices - 1), 5.0, 10.0))
    # one gain per material (blood is blood wherever it is), a small jitter per tissue
    material_gain = rng.uniform(0.65, 1.35, size=int(MATERIAL.max()) + 1)
    gains = material_gain[MATERIAL] * rng.uniform(0.96, 1.04, size=len(TISSUES))
    gains[AIR] = 1.0
    return SiteParams(
        name=f"site_{index:02d}",
        spacing_xy=round(float(spacing * rng.uniform(0.87, 1.13)), 4),
        slices=slices,
        slice_spacing=round(slice_spacing, 3),
        slice_thickness=round(float(min(slice_spacing, rng.uniform(5.0, 8.0))), 3),
        intensity_max=round(float(rng.uniform(300.0, 3000.0)), 1),
        gamma=round(float(rng.uniform(0.6, 1.6)), 4),
        tissue_gain=tuple(round(float(g), 4) for g in gains),
        noise_type="rician" if index % 2 == 0 else "gaussian",
        noise_std=round(float(rng.uniform(0.03, 0.09)), 4),
        bias_coeffs=tuple(round(float(c), 4) for c in rng.normal(0.0, 1.0, 6) * rng.uniform(0.15, 0.5)),
        psf_sigma_px=round(float(rng.uniform(0.5, 1.3)), 3),
        ghost_amplitude=round(float(rng.uniform(0.0, 0.08)), 4),
        texture_amplitude=round(float(rng.uniform(0.05, 0.12)), 4),
    )


# --------------------------------------------------------------------------- geometry


class _Angle:
    """Polar angle phi of the points around a centre, held as cos(phi) and sin(phi).

    Harmonics cos(k phi), sin(k phi) come from the Chebyshev recurrences in real float32
    arithmetic with rolling in-place buffers: much cheaper than arctan2 and cos per voxel.
    """

    def __init__(self, cos1: np.ndarray, sin1: np.ndarray) -> None:
        self.cos1 = cos1
        self.sin1 = sin1

    def wobble(self, harmonics) -> np.ndarray:
        """A smooth radial perturbation sum_k amp_k cos(k phi + phase_k)."""
        terms = {k: (amp * np.cos(ph), amp * np.sin(ph)) for k, amp, ph in harmonics}
        out = np.zeros(self.cos1.shape, dtype=np.float32)
        tmp = np.empty_like(out)
        two_c = self.cos1 * np.float32(2.0)
        c_prev, s_prev = np.ones_like(out), np.zeros_like(out)
        c_k, s_k = self.cos1.copy(), self.sin1.copy()
        for k in range(1, max(terms) + 1):
            if k > 1:  # x_{k} = 2 cos(phi) x_{k-1} - x_{k-2}, written into the x_{k-2} buffer
                for prev, cur in ((c_prev, c_k), (s_prev, s_k)):
                    np.multiply(two_c, cur, out=tmp)
                    np.subtract(tmp, prev, out=prev)
                c_prev, c_k = c_k, c_prev
                s_prev, s_k = s_k, s_prev
            if k in terms:
                a_cos, a_sin = terms[k]
                out += np.multiply(c_k, np.float32(a_cos), out=tmp)
                out -= np.multiply(s_k, np.float32(a_sin), out=tmp)
        return out

    def cos_to(self, phi0: float) -> np.ndarray:
        """cos(phi - phi0)."""
        out = self.cos1 * np.float32(np.cos(phi0))
        out += self.sin1 * np.float32(np.sin(phi0))
        return out


def _rho(X, Y, cx, cy, a, b, theta, angle=False):
    """Normalised elliptic radius (< 1 inside) of an ellipse, float32.

    With ``angle=True`` also returns an ``_Angle`` of the polar angle in the ellipse frame.
    In-place arithmetic keeps the number of full-size temporaries (and page faults) low.
    """
    f32 = np.float32
    dx = X - np.asarray(cx, f32)
    dy = Y - np.asarray(cy, f32)
    c, s = f32(np.cos(theta)), f32(np.sin(theta))
    a = np.maximum(np.asarray(a, f32), f32(1e-3))
    b = np.maximum(np.asarray(b, f32), f32(1e-3))
    shape = np.broadcast_shapes(dx.shape, dy.shape, a.shape, b.shape)
    u = np.empty(shape, f32)
    np.multiply(dx, c, out=u)
    u += dy * s
    u /= a
    v = np.empty(shape, f32)
    np.multiply(dy, c, out=v)
    v -= dx * s
    v /= b
    if not angle:
        u *= u
        v *= v
        u += v
        return np.sqrt(u, out=u)
    rho = np.hypot(u, v)
    inv = np.maximum(rho, f32(1e-6))
    np.divide(1.0, inv, out=inv)
    u *= inv
    v *= inv
    return rho, _Angle(u, v)


def _harmonics(rng, ks, amp):
    return [(k, amp * rng.uniform(0.3, 1.0), rng.uniform(0, 2 * np.pi)) for k in ks]


def _profile(t, p):
    """Half-ellipsoid radius profile: 1 at the base (t <= 0), 0 at t >= 1."""
    t = np.clip(t, 0.0, 1.0)
    return (1.0 - t ** p) ** (1.0 / p)


def _smooth_noise(rng, shape, sigma_px):
    """Zero-mean, unit-std Gaussian random field (float32), smoothed in-plane with an FFT."""
    out = _gaussian_blur(rng.standard_normal(shape, dtype=np.float32), sigma_px)
    out /= out.std() + np.float32(1e-8)
    return out


def _gaussian_blur(arr, sigma_px):
    """In-plane Gaussian blur of (..., H, W) via the FFT (periodic boundary), float32."""
    if sigma_px <= 0:
        return arr
    h, w = arr.shape[-2:]
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    transfer = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (fy ** 2 + fx ** 2)).astype(np.float32)
    spec = np.fft.rfft2(arr.astype(np.float32, copy=False))
    spec *= transfer
    return np.fft.irfft2(spec, s=(h, w)).astype(np.float32, copy=False)


@dataclass(frozen=True)
class PatientParams:
    """Anatomy of one patient; the ED frame, and the ES changes."""

    group: str
    height_cm: float
    weight_kg: float
    nb_frames: int
    es_frame: int
    slices: int
    above_base: int            # slices above the ventricular base (atria and great vessels, no labels)
    heart_x: float
    heart_y: float
    rotation: float
    ellipticity: float
    r_endo: float
    wall: float
    es_ratio: float
    length_factor: float
    profile_p: float
    rv_a: float
    rv_b: float
    rv_end: float
    rv_angle: float
    es_base_descent: float


def _patient_params(rng: np.random.Generator, site: SiteParams, anatomy: float) -> PatientParams:
    """One patient's anatomy; ``anatomy`` scales the spread of the heart's draws (``PatientVariation``)."""
    def heart_draw(low: float, high: float) -> float:
        draw = rng.uniform(low, high)
        if anatomy == 1.0:  # the draw itself, so that the default dataset stays identical to the bit
            return draw
        middle = (low + high) / 2
        return middle + anatomy * (draw - middle)

    group = GROUPS[int(rng.integers(len(GROUPS)))]
    r_endo, wall, es_ratio, rv_scale = {
        "NOR": (heart_draw(21, 26), heart_draw(7.0, 9.0), rng.uniform(0.60, 0.70), 1.0),
        "MINF": (heart_draw(25, 30), heart_draw(6.0, 8.0), rng.uniform(0.80, 0.90), 1.0),
        "DCM": (heart_draw(28, 33), heart_draw(5.5, 7.5), rng.uniform(0.85, 0.93), 1.05),
        "HCM": (heart_draw(17, 22), heart_draw(12.0, 16.0), rng.uniform(0.45, 0.58), 0.95),
        "RV": (heart_draw(20, 25), heart_draw(7.0, 9.0), rng.uniform(0.62, 0.72), heart_draw(1.3, 1.5)),
    }[group]
    heart_scale = heart_draw(0.85, 1.18)  # body size: the whole heart scales
    r_endo, wall = r_endo * heart_scale, wall * heart_scale
    rv_scale *= heart_scale
    height = rng.uniform(150, 195)
    bmi = rng.uniform(19, 33)
    nb_frames = int(rng.integers(12, 36))
    slices = int(np.clip(site.slices + rng.choice([-1, 0, 0, 1]), 6, 14))
    above_base = int(min(rng.choice([0, 0, 1, 1, 2]), slices - 6))
    return PatientParams(
        group=group,
        height_cm=round(float(height), 1),
        weight_kg=round(float(bmi * (height / 100) ** 2), 1),
        nb_frames=nb_frames,
        es_frame=int(np.clip(round(nb_frames * rng.uniform(0.3, 0.45)), 2, nb_frames)),
        slices=slices,
        above_base=above_base,
        heart_x=float(rng.uniform(-22, 22)),
        heart_y=float(rng.uniform(-18, 18)),
        rotation=float(heart_draw(-0.7, 0.7)),
        ellipticity=float(heart_draw(0.86, 1.0)),
        r_endo=float(r_endo),
        wall=float(wall),
        es_ratio=float(es_ratio),
        length_factor=float(heart_draw(1.02, 1.1)),
        profile_p=float(heart_draw(1.7, 2.4)),
        rv_a=float(heart_draw(33, 42) * rv_scale),
        rv_b=float(heart_draw(17, 23) * rv_scale),
        rv_end=float(heart_draw(0.66, 0.84)),
        rv_angle=float(np.pi + heart_draw(0.15, 0.55)),  # image left, slightly anterior
        es_base_descent=float(rng.uniform(0.03, 0.1)),
    )


def _towards(es_factor: float, phase: float) -> float:
    """Multiplier of an ED quantity at contraction ``phase``: 1 at ED, ``es_factor`` at ES."""
    return 1.0 + phase * (es_factor - 1.0)


def _render(pat: PatientParams, site: SiteParams, phase: float, n: int, depths: np.ndarray,
            rng: np.random.Generator, sub: int = 1) -> np.ndarray:
    """Tissue map (layers, n, n) int8 of one frame at the given depths (mm from the base slice).

    ``phase`` is the contraction of the frame: 0 at end-diastole, 1 at end-systole
    (``contraction``); the heart's radii, wall and base position interpolate between the two.

    Each run of ``sub`` consecutive depths is one slice (sub-slices for partial volume):
    the heart is drawn at every depth, the slowly varying surroundings once per slice.

    ``rng`` must be seeded per patient (not per frame) so that all frames share the same
    surroundings; only the heart changes between frames. The random stream is consumed
    identically for every phase.
    """
    scale = min(1.0, n * site.spacing_xy / REFERENCE_FOV_MM)
    coords = ((np.arange(n) - (n - 1) / 2.0) * site.spacing_xy / scale).astype(np.float32)  # anatomy mm
    coverage = (pat.slices - 1 - pat.above_base) * site.slice_spacing  # base to apex slice
    tissue = np.zeros((len(depths), n, n), dtype=np.int8)
    inner = _paint_surroundings(tissue, coords, depths, coverage, pat, rng, sub)
    _paint_heart(tissue, inner, coords, depths, coverage, pat, phase, rng)
    return tissue


def _paint_surroundings(tissue: np.ndarray, coords: np.ndarray, depths: np.ndarray, coverage: float,
                        pat: PatientParams, rng: np.random.Generator, sub: int) -> np.ndarray:
    """Paint the chest around the heart into ``tissue`` (L, n, n), once per slice of ``sub`` depths.

    Body, subcutaneous fat, chest-wall muscle and ribs; lungs with vessels; descending aorta
    and vertebra; liver and stomach rising towards the apex. ``coords`` (n,) are the pixel
    centres in anatomy mm, ``coverage`` the base-to-apex distance in mm.

    Returns:
        ``(1, n, n)`` bool: inside the chest-wall muscle.
    """
    L = len(depths)
    Y = coords[None, :, None]
    X = coords[None, None, :]
    d_slice = depths.reshape(-1, sub).mean(axis=1)[:, None, None]
    frac = np.clip(d_slice / max(coverage, 1e-6), 0.0, 1.1)  # 0 base (and above) .. 1 apex slice

    def paint(mask, value):
        if sub > 1 and mask.shape[0] == L // sub and L > sub:  # per-slice mask: repeat to sub-slices
            mask = np.repeat(mask, sub, axis=0)
        tissue[np.broadcast_to(mask, tissue.shape)] = value

    # --- body, subcutaneous fat, chest-wall muscle, ribs (all fixed along the stack)
    bmi = pat.weight_kg / (pat.height_cm / 100) ** 2
    body_a = rng.uniform(150, 185) * (bmi / 24) ** 0.3
    body_b = rng.uniform(105, 125) * (bmi / 24) ** 0.3
    body_cx, body_cy = rng.uniform(-8, 8), body_b - rng.uniform(62, 80)
    fat_t = np.clip(4 + (bmi - 19) * 1.1 + rng.uniform(-2, 2), 3, 22)
    mus_t = rng.uniform(8, 14)
    rb, zb = _rho(X, Y, body_cx, body_cy, body_a, body_b, 0.0, angle=True)
    rb = rb - zb.wobble(_harmonics(rng, (2, 3, 5), 0.015))
    band_fat = 1.0 - fat_t / body_b
    band_mus = band_fat - mus_t / body_b
    paint(rb < 1.0, SOFT)
    paint((rb < 1.0) & (rb >= band_fat), FAT)
    paint((rb < band_fat) & (rb >= band_mus), MUSCLE)
    for _ in range(6):  # rib cross-sections in the muscle band, some slices only
        ang = rng.uniform(-np.pi * 0.95, -np.pi * 0.05)
        rr = (band_fat + band_mus) / 2
        rx, ry = body_cx + rr * body_a * np.cos(ang), body_cy + rr * body_b * np.sin(ang)
        rib = _rho(X, Y, rx, ry, rng.uniform(5, 8), rng.uniform(3, 5), ang + np.pi / 2)
        present = np.cos(d_slice * rng.uniform(0.05, 0.12) + rng.uniform(0, 6.3)) > -0.2
        paint((rib < 1.0) & present, MARROW)
        paint((rib >= 1.0) & (rib < 1.3) & present, BONE)
    inner = rb < band_mus
    hx, hy = pat.heart_x, pat.heart_y

    # --- lungs with vessels (shrink towards the apex: diaphragm)
    lung_shrink = 1.0 - 0.35 * np.clip(frac, 0, 1)
    for side in (-1, 1):
        lx = hx + side * rng.uniform(58, 72)
        ly = hy + rng.uniform(-15, 5)
        rl, zl = _rho(X, Y, lx, ly, rng.uniform(45, 58) * lung_shrink, rng.uniform(70, 90) * lung_shrink,
                      side * rng.uniform(0.0, 0.3), angle=True)
        rl = rl - zl.wobble(_harmonics(rng, (2, 3, 4), 0.04))
        paint((rl < 1.0) & inner, LUNG)
        vessels = np.zeros((1, len(coords), len(coords)), dtype=bool)
        for _ in range(10):
            r = rng.uniform(1.2, 3.0)
            vessels |= _rho(X, Y, lx + rng.uniform(-35, 35), ly + rng.uniform(-50, 50), r, r, 0.0) < 1.0
        paint(vessels & (tissue == LUNG), VESSEL)

    # --- descending aorta and vertebra (posterior)
    ax, ay = hx + rng.uniform(18, 32), hy + rng.uniform(52, 64)
    ra = _rho(X, Y, ax, ay, rng.uniform(9, 12), rng.uniform(9, 12), 0.0)
    vx, vy = body_cx + rng.uniform(-4, 4), ay + rng.uniform(18, 26)
    rvb = _rho(X, Y, vx, vy, rng.uniform(15, 19), rng.uniform(13, 16), 0.0)
    paint((rvb < 1.0) & inner, BONE)
    paint((rvb < 0.82) & inner, MARROW)
    paint((ra < 1.0) & inner, AORTA)

    # --- liver (image lower left) and stomach (lower right), rising towards the apex
    t_liv = rng.uniform(0.15, 0.45)
    s_liv = np.sqrt(np.clip((frac - t_liv) / (1 - t_liv), 0, 1))
    rli, zli = _rho(X, Y, hx - rng.uniform(40, 55), hy + rng.uniform(55, 70),
                    rng.uniform(70, 90) * s_liv, rng.uniform(45, 60) * s_liv, rng.uniform(-0.4, 0.1), angle=True)
    rli = rli - zli.wobble(_harmonics(rng, (2, 3), 0.05))
    paint((rli < 1.0) & inner, LIVER)
    s_st = np.sqrt(np.clip((frac - t_liv - 0.2) / (1 - t_liv), 0, 1))
    rst = _rho(X, Y, hx + rng.uniform(35, 50), hy + rng.uniform(50, 65),
               rng.uniform(30, 40) * s_st, rng.uniform(22, 30) * s_st, rng.uniform(-0.5, 0.5))
    paint((rst < 1.0) & inner, STOMACH)
    return inner


def _paint_heart(tissue: np.ndarray, inner: np.ndarray, coords: np.ndarray, depths: np.ndarray, coverage: float,
                 pat: PatientParams, phase: float, rng: np.random.Generator) -> None:
    """Paint the heart at contraction ``phase`` into ``tissue`` (L, n, n), at every depth.

    Left ventricle (myocardium, cavity, papillary muscles, infarct thinning), right ventricle,
    mediastinum and patchy epicardial fat; above the base the atria and aortic root. Only
    pixels inside the heart's bounding box change; ``inner`` (1, n, n) bool, inside the
    chest-wall muscle, bounds what the heart's surroundings (mediastinum, fat, atria) reach.
    """
    Y = coords[None, :, None]
    X = coords[None, None, :]
    d = depths[:, None, None].astype(np.float64)
    hx, hy = pat.heart_x, pat.heart_y

    # --- heart geometry (scalars and per-layer radii/centres)
    c = float(phase)
    L_epi = coverage * pat.length_factor
    base = c * pat.es_base_descent * L_epi
    r_endo0 = pat.r_endo * _towards(pat.es_ratio, c)
    ring_area = (pat.r_endo + pat.wall) ** 2 - pat.r_endo ** 2
    ring_change = rng.uniform(0.95, 1.05)
    r_epi0 = math.sqrt(r_endo0 ** 2 + ring_area * _towards(ring_change, c))
    wall0 = r_epi0 - r_endo0
    t = (d - base) / (L_epi - base)
    t_endo = (d - base) / max(L_epi - base - 0.8 * wall0, 1.0)
    r_epi = r_epi0 * _profile(t, pat.profile_p)
    r_endo = r_endo0 * _profile(t_endo, pat.profile_p)
    drift = rng.uniform(3, 9) * np.clip(t, 0, 1)
    drift_dir = rng.uniform(0, 2 * np.pi)
    cx = hx + drift * np.cos(drift_dir)
    cy = hy + drift * np.sin(drift_dir)
    th, e = pat.rotation, pat.ellipticity
    endo_h = _harmonics(rng, (5, 7, 9), 0.05)
    epi_h = _harmonics(rng, (2, 3), 0.025)
    phi_inf = rng.uniform(0, 2 * np.pi)
    rv_prof = _profile(t / pat.rv_end, 2.0)
    rv_es = (rng.uniform(0.62, 0.75), rng.uniform(0.82, 0.92))
    rv_b = pat.rv_b * rv_prof * _towards(rv_es[0], c)
    rv_a = pat.rv_a * rv_prof * _towards(rv_es[1], c)
    ang = pat.rv_angle + th
    dist = 0.6 * r_epi + 0.45 * rv_b
    rvx, rvy = cx + dist * np.cos(ang), cy + dist * np.sin(ang)
    rv_wall_t = rng.uniform(2.5, 4.0)
    rv_h = _harmonics(rng, (2, 3, 6), 0.04)
    fat_w = rng.uniform(1.0, 3.0)
    patch_h = _harmonics(rng, (1, 2, 3), 1.0)
    patch_level = rng.uniform(0.3, 0.9)  # fat covers part of the epicardium only
    gap_w = rng.uniform(0.35, 0.6)
    phi_gap = pat.rv_angle - np.pi + rng.uniform(-0.6, -0.2)  # in the LV frame
    t_gap = rng.uniform(0.04, 0.1)
    papillary = [(th + pat.rv_angle + np.pi + (-1) ** k * rng.uniform(0.6, 1.0),
                  rng.uniform(2.5, 4.0) * (1.0 + 0.3 * c)) for k in range(2)]
    # above the base: left atrium opposite the RV, aortic root towards it, right atrium /
    # RV outflow where the RV was; blood-bright, thin-walled, labelled background (as in ACDC).
    # The atria fill while the ventricles contract.
    below = t >= 0.0
    atrial_wall = rng.uniform(1.5, 2.5)
    la_ang = ang + np.pi + rng.uniform(-0.5, 0.5)
    la_r = pat.r_endo * rng.uniform(0.8, 1.05) * (1.0 + 0.15 * c)
    la_e = rng.uniform(0.7, 0.9)
    ao_ang = ang - rng.uniform(0.4, 0.9)
    ao_r = 0.5 * pat.r_endo * rng.uniform(0.9, 1.2)
    lax, lay = cx + 0.55 * r_epi0 * np.cos(la_ang), cy + 0.55 * r_epi0 * np.sin(la_ang)
    aox, aoy = cx + 0.45 * r_epi0 * np.cos(ao_ang), cy + 0.45 * r_epi0 * np.sin(ao_ang)

    # the heart is drawn inside its bounding box only (radii padded for the wobbles)
    r_lv = (r_epi0 + max(4.0, fat_w)) * 1.15 + 2.0
    if not np.all(below):
        r_lv = max(r_lv, 0.55 * r_epi0 + la_r + atrial_wall + 6.0, 0.45 * r_epi0 + ao_r + atrial_wall + 6.0)
    r_rv = (max(float(np.max(rv_a)), float(np.max(rv_b))) + rv_wall_t + max(3.0, fat_w)) * 1.2 + 2.0
    lo_x = min(float(np.min(cx)) - r_lv, float(np.min(rvx)) - r_rv)
    hi_x = max(float(np.max(cx)) + r_lv, float(np.max(rvx)) + r_rv)
    lo_y = min(float(np.min(cy)) - r_lv, float(np.min(rvy)) - r_rv)
    hi_y = max(float(np.max(cy)) + r_lv, float(np.max(rvy)) + r_rv)
    x0, x1 = np.searchsorted(coords, lo_x), np.searchsorted(coords, hi_x, side="right")
    y0, y1 = np.searchsorted(coords, lo_y), np.searchsorted(coords, hi_y, side="right")
    if x1 <= x0 or y1 <= y0:
        return
    X, Y = X[:, :, x0:x1], Y[:, y0:y1, :]
    inner = inner[:, y0:y1, x0:x1]
    box = tissue[:, y0:y1, x0:x1]  # a view: painting it paints the tissue map

    def paint(mask, value):
        box[np.broadcast_to(mask, box.shape)] = value

    # --- left ventricle: truncated half-ellipsoid shell; ES: smaller cavity, thicker wall
    rho_epi, z = _rho(X, Y, cx, cy, r_epi, r_epi * e, th, angle=True)
    rho_endo = _rho(X, Y, cx, cy, r_endo, r_endo * e, th)
    epi_w = z.wobble(epi_h)
    rho_epi -= epi_w
    rho_endo -= z.wobble(endo_h) * np.clip(t, 0.2, 1.0).astype(np.float32)
    if pat.group == "MINF":  # thinned infarct sector
        rho_epi += np.float32(0.55 * wall0 / max(r_epi0, 1.0)) * np.clip(z.cos_to(phi_inf), 0, 1) ** 3
    epi = (rho_epi < 1.0) & below
    cav = (rho_endo < 1.0) & epi

    # --- right ventricle: an ellipse beside the LV minus the LV: a crescent on the septum
    rho_rv, zr = _rho(X, Y, rvx, rvy, rv_b, rv_a, ang, angle=True)
    rv_w = zr.wobble(rv_h)
    rho_rvo = _rho(X, Y, rvx, rvy, rv_b + rv_wall_t, rv_a + rv_wall_t, ang) - rv_w
    has_rv = (rv_b > 1.5) & below
    rv_cav = (rho_rv - rv_w < 1.0) & ~epi & has_rv
    rv_out = (rho_rvo < 1.0) & has_rv
    heart = epi | rv_out

    # --- mediastinum around the heart clears the lungs; patchy epicardial fat
    rho_med = _rho(X, Y, cx, cy, r_epi + 4, (r_epi + 4) * e, th)
    rho_medrv = _rho(X, Y, rvx, rvy, rv_b + rv_wall_t + 3, rv_a + rv_wall_t + 3, ang)
    med = ((rho_med < 1.0) | ((rho_medrv < 1.0) & has_rv)) & inner
    paint(med & ~heart, SOFT)
    rho_fat = _rho(X, Y, cx, cy, r_epi + fat_w, (r_epi + fat_w) * e, th) - epi_w
    rho_fatrv = _rho(X, Y, rvx, rvy, rv_b + rv_wall_t + fat_w, rv_a + rv_wall_t + fat_w, ang)
    patch = z.wobble(patch_h) > patch_level
    fat_ring = ((rho_fat < 1.0) | ((rho_fatrv < 1.0) & has_rv)) & ~heart & patch
    paint(fat_ring & inner, PERI_FAT)
    paint(rv_out & ~epi, RV_WALL)
    paint(rv_cav, RV_BLOOD)
    if not np.all(below):
        above = ~below & inner
        chambers = (
            (_rho(X, Y, lax, lay, la_r, la_r * la_e, la_ang), la_r, OUTFLOW),
            (_rho(X, Y, rvx, rvy, 0.9 * rv_b, 0.8 * rv_a, ang) - rv_w, 0.8 * pat.rv_b, OUTFLOW),
            (_rho(X, Y, aox, aoy, ao_r, ao_r, 0.0), ao_r, AORTA),
        )
        for rho, radius, _ in chambers:  # mediastinum, then walls, then blood
            paint((rho < 1.0 + (atrial_wall + 3.0) / radius) & above, SOFT)
        for rho, radius, _ in chambers:
            paint((rho < 1.0 + atrial_wall / radius) & above, RV_WALL)
        for rho, _, blood in chambers:
            paint((rho < 1.0) & above, blood)
    paint(epi, MYO)
    paint(cav, LV_BLOOD)
    # open ring at the base: left-ventricular outflow tract on the RV side (label 0)
    paint((z.cos_to(phi_gap) > np.cos(gap_w)) & (t < t_gap) & epi & ~cav, OUTFLOW)
    # papillary muscles inside the cavity (labelled as LV cavity, like ACDC)
    for pa, pr in papillary:
        px, py = cx + 0.6 * r_endo * np.cos(pa), cy + 0.6 * r_endo * np.sin(pa)
        present = (t > 0.2) & (t < 0.75) & (r_endo > 3 * pr)
        paint((_rho(X, Y, px, py, pr, pr, 0.0) < 1.0) & cav & present, PAPILLARY)


def _labels_from_tissue(tissue: np.ndarray) -> np.ndarray:
    seg = np.zeros(tissue.shape, dtype=np.uint8)
    seg[tissue == RV_BLOOD] = 1
    seg[tissue == MYO] = 2
    seg[(tissue == LV_BLOOD) | (tissue == PAPILLARY)] = 3
    return seg


def contraction(frame: int, nb_frames: int, es_frame: int) -> float:
    """Contraction phase of 1-based cine ``frame``: 0 at ED (frame 1), 1 at ES (``es_frame``).

    Systole is a smooth sin^2 rise over frames 1..ES; diastole relaxes with a cos^2 fall
    over the remaining frames, reaching ED again one frame after the last.
    """
    if frame <= es_frame:
        return math.sin(0.5 * math.pi * (frame - 1) / max(es_frame - 1, 1)) ** 2
    return math.cos(0.5 * math.pi * (frame - es_frame) / (nb_frames - es_frame + 1)) ** 2


def _make_frame(pat: PatientParams, site: SiteParams, phase: float, n: int, anatomy_seed: list[int],
                noise_rng: np.random.Generator, patient_gain: np.ndarray,
                bias_jitter: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One frame at contraction ``phase``: stored image (Z, n, n) int16 and labels (Z, n, n) uint8.

    ``patient_gain`` (per tissue) and ``bias_jitter`` (per bias coefficient) are the
    patient's own contrast and coil shading, the same in every frame of the patient.
    """
    z = pat.slices
    centres = (np.arange(z) - pat.above_base) * site.slice_spacing  # mm below the ventricular base
    offsets = np.array([-1.0, 0.0, 1.0]) * site.slice_thickness / 3.0
    depths = (centres[:, None] + offsets[None, :]).reshape(-1)
    tissue = _render(pat, site, phase, n, depths, np.random.default_rng(anatomy_seed), sub=3)
    tissue = tissue.reshape(z, 3, n, n)
    labels = _labels_from_tissue(tissue[:, 1])

    f32 = np.float32
    lut = (np.clip(BASE_INTENSITY * np.asarray(site.tissue_gain) * patient_gain, 0.0, 1.0) ** site.gamma).astype(f32)
    tex_rng = np.random.default_rng(anatomy_seed + [7])  # texture is anatomy: same in every frame
    texture = _smooth_noise(tex_rng, (z, n, n), 2.0)
    texture *= f32(site.texture_amplitude)
    texture += f32(1.0)
    img = lut[tissue].mean(axis=1, dtype=f32)
    img *= texture
    # blood signal varies with flow: smooth +-6 % modulation inside the blood pools
    flow = _smooth_noise(noise_rng, (z, n, n), 4.0)
    blood = (tissue[:, 1] == LV_BLOOD) | (tissue[:, 1] == RV_BLOOD) | (tissue[:, 1] == AORTA)
    img[blood] *= 1.0 + 0.06 * flow[blood]
    img = _gaussian_blur(img, site.psf_sigma_px)
    if site.ghost_amplitude > 0:  # phase-encode ghost from breathing / arrhythmia
        img += f32(site.ghost_amplitude) * np.roll(img, n // 2, axis=1)
    # smooth multiplicative bias field (receive-coil shading), site pattern + patient jitter
    g = np.linspace(-1.0, 1.0, n)
    gy, gx = g[None, :, None], g[None, None, :]
    gz = np.linspace(-1.0, 1.0, z)[:, None, None] if z > 1 else np.zeros((1, 1, 1))
    c = np.asarray(site.bias_coeffs) * bias_jitter
    bias = np.exp(c[0] * gx + c[1] * gy + c[2] * gx * gy + c[3] * gx ** 2 + c[4] * gy ** 2 + c[5] * gz)
    img *= (bias / bias.mean()).astype(f32)
    sigma = f32(site.noise_std)
    noise = noise_rng.standard_normal(img.shape, dtype=f32)
    noise *= sigma
    img += noise
    if site.noise_type == "rician":  # magnitude of a complex signal with noise in both channels
        noise = noise_rng.standard_normal(img.shape, dtype=f32)
        noise *= sigma
        img = np.hypot(img, noise)
    else:
        np.maximum(img, 0.0, out=img)
    stored = np.clip(np.rint(img * site.intensity_max), 0, np.iinfo(np.int16).max).astype(np.int16)
    return stored, labels


def _affine(site: SiteParams, n: int, z: int) -> np.ndarray:
    """Voxel (i=x, j=y, k=slice) to mm: spacing on the diagonal, FOV centred on the origin."""
    s = (site.spacing_xy, site.spacing_xy, site.slice_spacing)
    aff = np.diag([*s, 1.0])
    aff[:3, 3] = [-(n - 1) / 2 * s[0], -(n - 1) / 2 * s[1], -(z - 1) / 2 * s[2]]
    return aff


def _save_nifti(path: Path, zyx: np.ndarray, affine: np.ndarray) -> None:
    """Write a (Z, Y, X) stack, or a (T, Z, Y, X) cine sequence, as NIfTI (x, y, z[, t])."""
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(zyx.T), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


_ALLOCATOR_TUNED = False


def _tune_allocator() -> None:
    """Let glibc keep freed memory for reuse (once per process; no-op elsewhere).

    Rendering allocates many short-lived multi-MB arrays; with glibc's default trimming
    each one is fresh memory and page faults dominate (measured ~1.7x slower). The values
    set here are the ceilings glibc's own dynamic thresholds grow to on 64-bit Linux.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 * 1024 * 1024)   # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _patient_look(rng: np.random.Generator, variation: float) -> tuple[np.ndarray, np.ndarray]:
    """A patient's own contrast and coil shading, the same in every frame of the patient.

    Returns ``(patient_gain, bias_jitter)``: a multiplier per tissue (order of TISSUES;
    one per material, +-15 %, with a +-3 % jitter per tissue) and a multiplier per bias
    coefficient (0.4 to 1.6). ``variation`` scales each spread around 1 (1: the ranges
    above, 0: every patient of a site looks alike); the draws do not depend on it.
    """
    def spread(draw: np.ndarray) -> np.ndarray:
        return 1.0 + variation * (draw - 1.0)

    patient_gain = spread(rng.uniform(0.85, 1.15, int(MATERIAL.max()) + 1))[MATERIAL]
    patient_gain *= spread(rng.uniform(0.97, 1.03, len(TISSUES)))
    return patient_gain, spread(rng.uniform(0.4, 1.6, 6))


def generate_dataset(out: Path, sites: int, patients_per_site: int, seed: int,
                     image_size: int = 128, spacing: float = 1.5, cine: bool = False,
                     variation: PatientVariation = PatientVariation()) -> Path:
    """Write the multi-site synthetic dataset in ACDC layout and return the manifest path.

    Layout: ``<out>/site_XX/patientNNN/patientNNN_frameFF.nii.gz`` (+ ``_gt``) for the
    ED and ES frames, ``Info.cfg`` per patient, and ``<out>/manifest.json``. With
    ``cine`` every patient also gets ``patientNNN_4d.nii.gz``: all ``NbFrame`` frames of
    the cardiac cycle, unlabeled, whose ED and ES frames equal the 3D files. Patient
    numbers are unique across the dataset. Arrays are identical for the same arguments
    (the ED and ES files do not depend on ``cine``). ``variation`` scales how much the
    patients of one site differ in heart anatomy and in contrast and coil shading (see
    ``PatientVariation``; scanners are the same at every value).

    Raises:
        DataError: ``out`` exists and is not empty, or an argument is out of range.
    """
    out = Path(out)
    if sites < 1 or patients_per_site < 1:
        raise DataError(out, f"need at least one site and one patient, got sites={sites}, "
                             f"patients_per_site={patients_per_site}")
    if image_size < 16 or not spacing > 0:
        raise DataError(out, f"image_size must be >= 16 and spacing > 0, got {image_size}, {spacing}")
    problem = variation.problem()
    if problem:
        raise DataError(out, problem)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(out, "already exists and is not empty; choose a new folder or delete it")
    out.mkdir(parents=True, exist_ok=True)
    _tune_allocator()
    width = max(3, len(str(sites * patients_per_site)))
    manifest: dict = {
        "generator": "fcl-flower synthetic cardiac MRI",
        "version": GENERATOR_VERSION,
        "format": "acdc",
        "seed": seed,
        "params": {"sites": sites, "patients_per_site": patients_per_site,
                   "image_size": image_size, "spacing": spacing, "cine": cine,
                   "patient_variation": variation.look, "anatomy_variation": variation.anatomy},
        "labels": LABELS,
        "tissues": list(TISSUES),
        "sites": [],
        "site_params": {},
        "patients": {},
    }
    for s in range(sites):
        site = _site_params(seed, s, sites, spacing)
        site_dir = out / site.name
        site_dir.mkdir()
        manifest["sites"].append(site.name)
        manifest["site_params"][site.name] = asdict(site)
        manifest["patients"][site.name] = []
        for p in range(patients_per_site):
            number = s * patients_per_site + p + 1
            pid = f"patient{number:0{width}d}"
            pat_seed = [seed, 0xCA4D, s, p]
            pat = _patient_params(np.random.default_rng(pat_seed + [0]), site, variation.anatomy)
            patient_gain, bias_jitter = _patient_look(np.random.default_rng(pat_seed + [3]), variation.look)
            pdir = site_dir / pid
            pdir.mkdir()
            affine = _affine(site, image_size, pat.slices)
            labeled = {1: "ED", pat.es_frame: "ES"}
            cycle = []
            for number_f in range(1, pat.nb_frames + 1) if cine else sorted(labeled):
                img, lab = _make_frame(
                    pat, site, contraction(number_f, pat.nb_frames, pat.es_frame), image_size, pat_seed + [2],
                    np.random.default_rng(pat_seed + [1, number_f]), patient_gain, bias_jitter,
                )
                if cine:
                    cycle.append(img)
                if number_f in labeled:
                    stem = f"{pid}_frame{number_f:02d}"
                    _save_nifti(pdir / f"{stem}.nii.gz", img, affine)
                    _save_nifti(pdir / f"{stem}_gt.nii.gz", lab, affine)
            if cine:
                _save_nifti(pdir / f"{pid}_4d.nii.gz", np.stack(cycle), affine)
            (pdir / "Info.cfg").write_text(
                f"ED: 1\nES: {pat.es_frame}\nGroup: {pat.group}\nHeight: {pat.height_cm}\n"
                f"NbFrame: {pat.nb_frames}\nWeight: {pat.weight_kg}\n"
            )
            manifest["patients"][site.name].append(pid)
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def ensure_builtin_dataset(cache_root: Path, sites: int, patients_per_site: int, seed: int,
                           image_size: int, spacing: float, cine: bool = False,
                           variation: PatientVariation = PatientVariation()) -> Path:
    """The built-in synthetic dataset for these settings, generated once under ``cache_root``.

    Safe when several processes ask at once: each generates into a private temporary
    folder and renames it into place; the loser discards its copy (outputs are identical).
    Returns the dataset folder (one sub-folder per site).
    """
    cache_root = Path(cache_root).expanduser()
    key = (f"v{GENERATOR_VERSION}_sites{sites}_p{patients_per_site}_seed{seed}_n{image_size}_sp{spacing:g}"
           + ("_cine" if cine else "") + variation.cache_suffix())
    final = cache_root / key
    if (final / "manifest.json").is_file():
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        generate_dataset(tmp, sites, patients_per_site, seed, image_size, spacing, cine, variation)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "manifest.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
