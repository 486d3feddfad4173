"""Grad-CAMs of the four encoder blocks, from one backward pass (DESIGN.md section 1).

A score function receives zero "probe" tensors shaped like the block activations A_k (C2..C5) and
adds them to the activations inside the encoder; d score / d probe_k = d score / d A_k, so one
`jax.vjp` yields the gradients of all four blocks at the cost of one backward pass, not four.

Per block: weights = spatial mean of the gradient (B, C); CAM = ReLU(sum_c w_c A_c) (B, h, w);
min-max normalised per image to [0, 1] (a constant map gives 0); bilinearly resized to the input;
`stop_gradient`, so the CAMs are labels for the losses, never a path for their gradients.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def normalize_per_image(cam: jax.Array) -> jax.Array:
  """(B, h, w) -> (B, h, w) min-max scaled to [0, 1] per image; 0 where an image's map is constant."""
  low = jnp.min(cam, axis=(1, 2), keepdims=True)
  span = jnp.max(cam, axis=(1, 2), keepdims=True) - low
  return jnp.where(span > 0, (cam - low) / jnp.where(span > 0, span, 1.0), 0.0)


def grad_cam(activation: jax.Array, gradient: jax.Array, *, size: tuple[int, int]) -> jax.Array:
  """Grad-CAM of one block: activation, gradient (B, h, w, C) -> (B, H, W) float32 in [0, 1]."""
  activation = activation.astype(jnp.float32)
  weights = jnp.mean(gradient.astype(jnp.float32), axis=(1, 2))  # (B, C)
  cam = jax.nn.relu(jnp.einsum('bhwc,bc->bhw', activation, weights))  # (B, h, w)
  cam = normalize_per_image(cam)
  cam = jax.image.resize(cam, (cam.shape[0], *size), method='bilinear')  # (B, H, W)
  # Bilinear upsampling is a convex combination, so this only removes rounding excursions.
  return jnp.clip(cam, 0.0, 1.0)


def grad_cams(score_fn: Callable, probes: Sequence[jax.Array], *, size: tuple[int, int]):
  """Runs `score_fn` once forward and once backward; returns (cams (B, K, H, W), aux).

  score_fn(probes) -> (score scalar, (activations, aux)), where `activations` is the sequence of K
  block activations (with the probes added) and `aux` anything else the caller wants from the same
  forward pass (features, batch statistics). The CAMs are under `stop_gradient`; `aux` is not, so
  the caller's losses can still differentiate through the shared forward pass.
  """
  score, vjp_fn, (activations, aux) = jax.vjp(score_fn, list(probes), has_aux=True)
  (gradients,) = vjp_fn(jnp.ones_like(score))
  # Cut both inputs too, so an outer jax.grad never builds tangents for the CAM branch.
  activations, gradients = jax.lax.stop_gradient((activations, gradients))
  cams = jnp.stack([grad_cam(a, g, size=size) for a, g in zip(activations, gradients)], axis=1)
  return jax.lax.stop_gradient(cams), aux
