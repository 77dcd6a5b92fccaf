"""Gradient parity as issue #14 states it: fp32, 1e-5 relative, per parameter tensor.

Relative to the tensor's norm (||g - g_ref|| / ||g_ref||), not element by element: an element near zero has no
meaningful relative error, and an elementwise rtol needs an atol that would hide real differences. A tensor whose
gradient is zero in exact arithmetic (a key bias: softmax ignores a constant added to a row's scores) holds only
rounding noise, ~1e-10 of the largest gradient, so norms are floored at 1e-3 of the largest tensor's norm."""

GRADIENT_RTOL = 1e-5
NORM_FLOOR = 1e-3  # of the largest parameter gradient's norm


def gradient_relative_errors(grads: dict, ref: dict) -> dict:
    floor = NORM_FLOOR * max(float(g.double().norm()) for g in ref.values())
    return {n: float((grads[n].double() - ref[n].double()).norm()) / max(float(ref[n].double().norm()), floor)
            for n in ref}


def assert_gradients_equal(grads: dict, ref: dict, rtol: float = GRADIENT_RTOL) -> None:
    errors = gradient_relative_errors(grads, ref)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"{worst}: relative gradient error {errors[worst]:.2e} > {rtol:.0e}"
