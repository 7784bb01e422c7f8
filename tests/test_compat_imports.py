"""The import-path twins of ssm_ext.compat re-export the ssm_ext functions, and importing
ssm_ext does not shadow the peer packages' top-level names."""

import importlib.util
import subprocess
import sys

import torch

import ssm_ext.causal_conv1d as ours
from ssm_ext.reference import causal_conv1d as ref

from helpers import assert_rel


def test_causal_conv1d_twins_are_ssm_ext_functions():
    from ssm_ext.compat.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    assert causal_conv1d_fn is ours.causal_conv1d_fn
    assert causal_conv1d_update is ours.causal_conv1d_update

    from ssm_ext.compat.causal_conv1d.causal_conv1d_interface import (
        causal_conv1d_fn as fn2,
        causal_conv1d_ref,
        causal_conv1d_update as update2,
        causal_conv1d_update_ref,
    )
    assert fn2 is ours.causal_conv1d_fn and update2 is ours.causal_conv1d_update
    assert causal_conv1d_ref is ours.causal_conv1d_ref
    assert causal_conv1d_update_ref is ours.causal_conv1d_update_ref

    from ssm_ext.compat.causal_conv1d.causal_conv1d_varlen import causal_conv1d_varlen_states
    assert causal_conv1d_varlen_states is ours.causal_conv1d_varlen_states


def test_causal_conv1d_twins_compute_the_reference():
    from ssm_ext.compat.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    from ssm_ext.compat.causal_conv1d.causal_conv1d_varlen import causal_conv1d_varlen_states

    b, D, L, W = 2, 16, 11, 4
    x = torch.randn(b, D, L)
    w, bias = torch.randn(D, W), torch.randn(D)
    out, final = causal_conv1d_fn(x, w, bias, return_final_states=True, activation="silu")
    r_out, r_final = ref.causal_conv1d(x, w, bias, activation="silu")
    assert_rel(out, r_out, 1e-5, "causal_conv1d_fn out")
    assert_rel(final, r_final, 0.0, "causal_conv1d_fn final_states")

    state = torch.randn(b, D, W - 1)
    xt = torch.randn(b, D)
    r_y, r_state = ref.causal_conv1d_update(xt, state, w, bias, "silu")
    y = causal_conv1d_update(xt, state, w, bias, "silu")
    assert_rel(y, r_y, 1e-5, "causal_conv1d_update out")
    assert_rel(state, r_state, 0.0, "causal_conv1d_update conv_state")

    xv = torch.randn(9, D)
    cu = torch.tensor([0, 2, 9], dtype=torch.int32)
    assert_rel(causal_conv1d_varlen_states(xv, cu, 3), ref.causal_conv1d_varlen_states(xv, cu, 3), 0.0,
               "causal_conv1d_varlen_states")


def test_import_does_not_shadow_peer_packages():
    # In a fresh interpreter: whatever `causal_conv1d` resolves to after `import ssm_ext` must be
    # what it resolved to before (the peer, or nothing), never ssm_ext's twin.
    code = (
        "import importlib.util as u\n"
        "before = u.find_spec('causal_conv1d')\n"
        "import ssm_ext, ssm_ext.compat.causal_conv1d\n"
        "after = u.find_spec('causal_conv1d')\n"
        "origin = lambda s: None if s is None else s.origin\n"
        "assert origin(before) == origin(after), (origin(before), origin(after))\n"
        "assert after is None or 'ssm_ext' not in (after.origin or ''), after.origin\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    spec = importlib.util.find_spec("causal_conv1d")
    assert spec is None or "ssm_ext" not in (spec.origin or "")
