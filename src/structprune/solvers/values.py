"""Coordination inside one layer's attention: the kept heads' value rows refitted with the output
projection, the attention probabilities frozen (issue 27; docs/structprune.md section 4).

After the head choice and the least-squares refit of ``o_proj`` (solvers/modules.py), the kept
rows of ``v_proj`` still hold their dense values. With ``q`` and ``k`` unchanged, head ``h``'s
output (before ``o_proj``) is exactly linear in its KV group's value rows:

    z_h = P_h (X W_g^T + 1 b_g^T) = Y_h W~_g^T,   Y_h = [P_h X, 1],   W~_g = [W_g, b_g]

(``P_h`` the attention probabilities, whose rows sum to 1, so the bias rides along as a constant
column; ``X`` the attention's input; ``g`` the head's KV group). ``P_h X`` comes from the family's
own attention function (whatever ``config._attn_implementation`` names: eager, sdpa, ...) called
with ``X`` as the values of every KV group: the function is swapped for one forward through
transformers' ``AttentionInterface``, so rope, masks, sliding windows and soft-capping are the
model's own. The exact problem

    min_{W~, W_o, c}  sum_tokens |t - W_o z(W~) - c|^2

(``t`` the module's W-step target on the pruned model's inputs) is a bilinear least squares; with
an auxiliary ``q`` per token for ``o_proj``'s input it becomes

    L = alpha |t - W_o q - c|^2 + gamma sum_h |q_h - Y_h W~_g(h)^T|^2

whose blocks have closed forms:

* ``q = (alpha W_o^T W_o + gamma I)^-1 (alpha W_o^T (t - c) + gamma z)``: one ``k x k`` factor per
  iteration, applied to every token (``z`` the heads' outputs under the current ``W~``);
* ``W~_g = (sum_{h in g} q_h^T Y_h + delta W~_g)(sum_{h in g} Y_h^T Y_h + delta I)^-1`` per KV group,
  a ridge toward the current rows (``delta = damp * mean diag``, as solvers/inner.py);
* ``W_o``, ``c``: least squares of ``t`` on ``q`` (solvers/obs.py ``refit``).

Only the Gram ``sum Y_h^T Y_h`` needs ``P_h X`` itself (``d`` wide: ``d / head_dim`` times an
attention's value work), and it does not change across iterations (``P`` and ``X`` are fixed): it is
accumulated once, in the first iteration, factored, and the factors are kept for the later ones (in
an activation store, RAM within the activation budget and disk beyond, when the groups needed
several batches). The Grams of all groups of a large layer do not fit at once (32 of ``(d + 1)^2``
float64 for a 7B MHA layer: 4.3 GB), so the first iteration captures the groups in batches that fit
``engine.budget.VALUE_BATCH_BYTES``. The cross term ``sum_{h in g} q_h^T Y_h = (sum_h P_h^T q_h)^T [X, 1]``
is one ordinary backward of ``<q, z>`` through the attention function to its values (``head_dim``
wide) in the pass that computes ``z`` and ``q``: every iteration after the first is one such pass.
All groups are updated from the same ``q`` (a Jacobi sweep), so the batching cannot change the result.

Since ``z`` is exactly linear in ``W~`` given ``P``, the final check is exact: after the iterations
``W_o``, ``c`` are refitted on the true ``z`` of the new rows, and the new rows are kept only if that
exact calibration error is below the plain refit's; otherwise the layer is left bit for bit as it was.

Every sum over tokens is float64 accumulated from float32 per-chunk products and reduced with
``distributed.sum_tensors``; the scalar errors are per-chunk values added with ``fsum_parts``, so a
distributed run gets the same bits as one process.
"""

from __future__ import annotations

import sys
import time

import torch

from ..adapters.config_view import LayerConfig
from ..engine import distributed
from ..engine.activations import ActivationStore
from ..engine.budget import value_batches, value_refit_bytes
from ..engine.capture import layer_kwargs, to_device
from ..engine.clock import timed_call
from ..engine.stats import StatsAccumulator
from ..surgery import set_output_projection
from .inner import as_tokens
from .obs import refit

#: the penalties of ``L`` (module docstring): only their ratio matters, 1 as the MLP's (solvers/inner.py)
ALPHA, GAMMA = 1.0, 1.0
#: the name the probe is registered under in transformers' AttentionInterface
PROBE = "structprune_values"
#: implementations that take values wider than the queries (the others get head_dim-wide slices)
WIDE_VALUES = (None, "eager", "sdpa")

_ACTIVE: dict = {}  # the sweep whose layer is running (one at a time)


class _Captured(Exception):
    """Raised by the probe once it has handled a chunk: the rest of the layer is not needed."""


class _Missed(Exception):
    """The attention's output reached ``o_proj`` without the probe: it does not call the interface."""


def _probe(module, query, key, value, attention_mask, *args, **kwargs):
    sweep = _ACTIVE.get("sweep")
    if sweep is None or module is not sweep.module:
        raise RuntimeError("structprune's value probe ran outside its sweep")
    sweep.seen(query, key, attention_mask, args, kwargs)
    raise _Captured


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PROBE, _probe)


def _original_attention(attn):
    """``(the attention function attn's forward would call, its implementation's name)``; None if the
    modeling module has no eager function to fall back on."""
    impl = getattr(attn.config, "_attn_implementation", None)
    mod = sys.modules.get(type(attn).__module__)
    eager = getattr(mod, "eager_attention_forward", None)
    if impl in (None, "eager"):
        return eager, impl
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    interface = getattr(mod, "ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS)
    get = getattr(interface, "get_interface", None)
    return (get(impl, eager) if get is not None else interface[impl]), impl


class _Call:
    """One chunk's attention call as the layer made it (queries and keys with rope and norms, the mask,
    scaling, sliding window, soft-capping), the attention's input ``x`` ([B, S, d]), and the
    original attention function to run it with other values."""

    def __init__(self, fn, module, query, key, mask, args, kwargs, x, width):
        self.fn, self.module, self.query, self.key, self.mask = fn, module, query, key, mask
        self.args, self.kwargs, self.x, self.width = args, kwargs, x, width
        self.heads, self.groups = query.shape[1], key.shape[1]
        self.n_rep = self.heads // self.groups
        self.tokens = x.shape[0] * x.shape[1]

    def attend(self, values: torch.Tensor, groups: range) -> torch.Tensor:
        """``[B, S, heads of groups, e]``: the attention of the query heads of KV ``groups`` on
        ``values`` ([B, len(groups), S, e])."""
        hs = slice(groups.start * self.n_rep, groups.stop * self.n_rep)
        q, k, mask = self.query[:, hs], self.key[:, groups.start:groups.stop], self.mask
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[1] == self.heads > 1:
            mask = mask[:, hs]
        out, _ = self.fn(self.module, q, k, values.to(q.dtype), mask, *self.args, **self.kwargs)
        return out

    def _values(self, V: torch.Tensor, bias: bool) -> torch.Tensor:
        """``[B, groups, S, head_dim]``: the values of rows ``V`` ([groups * head_dim, d (+1)], bias last)."""
        B, S, d = self.x.shape
        Vf = V.to(self.x.device, torch.float32)
        v = self.x.float() @ Vf[:, :d].T
        if bias:
            v = v + Vf[:, d]
        return v.view(B, S, self.groups, -1).transpose(1, 2)

    def outputs(self, V: torch.Tensor, bias: bool) -> torch.Tensor:
        """``z`` ([tokens, heads * head_dim], float32): every kept head's output with value rows ``V``,
        by the attention function itself."""
        return self.attend(self._values(V, bias), range(self.groups)).reshape(self.tokens, -1).float()

    def outputs_and_cross(self, V: torch.Tensor, bias: bool, aux) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z, q, C)``: the outputs ``z`` as :meth:`outputs`, ``q = aux(z)`` ([tokens, heads * head_dim])
        and per KV group ``C_g = sum_{h in g} q_h^T [P_h X, 1]`` ([groups, head_dim, d (+1)], float32),
        from one backward of ``<q, z>`` through the attention function to its values: ``z`` is linear in
        them, so the gradient is ``sum_{h in g} P_h^T q_h`` (head_dim wide, not d), and
        ``q_h^T P_h [X, 1] = (P_h^T q_h)^T [X, 1]`` (rows of ``P_h`` sum to 1)."""
        v = self._values(V, bias).detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.attend(v, range(self.groups))
            z = out.detach().reshape(self.tokens, -1).float()
            q = aux(z)
            (g,) = torch.autograd.grad(out, v, grad_outputs=q.view(out.shape).to(out.dtype))
        x = self.x.float().reshape(self.tokens, -1)
        if bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
        g = g.float().transpose(1, 2).reshape(self.tokens, self.groups, -1)  # [tokens, groups, head_dim]
        return z, q, torch.einsum("tgj,te->gje", g, x)

    def mixed_inputs(self, groups: range, bias: bool) -> torch.Tensor:
        """``Y`` ([tokens, heads of groups, d (+1)], float32): ``[P_h X, 1]`` of the query heads of
        KV ``groups``, from the attention function with ``x`` as every group's values (in
        ``width``-wide slices where the implementation needs values as wide as the queries)."""
        B, S, d = self.x.shape
        pieces = []
        for i in range(0, d, self.width):
            xs = self.x[..., i:i + self.width]
            pieces.append(self.attend(xs[:, None].expand(B, len(groups), S, xs.shape[-1]), groups))
        y = (pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)).reshape(self.tokens, -1, d).float()
        return torch.cat([y, y.new_ones(*y.shape[:2], 1)], -1) if bias else y


class _Sweep:
    """Runs the layer over every chunk with the attention function swapped for the probe; for each
    chunk ``on_chunk(c, call)`` gets the :class:`_Call`. The layer's forward stops in the probe."""

    def __init__(self, adapter, layer, inputs, device):
        self.adapter, self.layer, self.inputs, self.device = adapter, layer, inputs, device
        self.module = adapter.attention_module(layer)
        self.fn, impl = _original_attention(self.module)
        self.head_dim = adapter.attention_shape(layer).head_dim
        self.wide = impl in WIDE_VALUES
        self.x = None
        self.handler = None
        self.chunk = 0

    def seen(self, query, key, mask, args, kwargs) -> None:
        x = self.x
        width = x.shape[-1] if self.wide else self.head_dim
        self.handler(self.chunk, _Call(self.fn, self.module, query, key, mask, args, kwargs, x, width))

    def run(self, on_chunk) -> None:
        qkv, o = self.adapter.attn_linears(self.layer)

        def keep_x(m, a):
            self.x = a[0]

        def missed(m, a, y):
            raise _Missed

        _register()
        handles = [qkv[-1].register_forward_pre_hook(keep_x), o.register_forward_hook(missed)]
        saved = self.module.config
        self.module.config = LayerConfig(saved, _attn_implementation=PROBE)
        self.handler = on_chunk
        _ACTIVE["sweep"] = self
        try:
            with torch.no_grad():
                for c, (h, kw) in enumerate(zip(self.inputs.hidden, self.inputs.kwargs)):
                    self.chunk = c
                    try:
                        self.layer(h.to(self.device, self.inputs.hidden.source_dtype or h.dtype),
                                   **to_device(layer_kwargs(self.layer, kw), self.device))
                    except _Captured:
                        pass
        finally:
            _ACTIVE.pop("sweep", None)
            self.module.config = saved
            self.x = self.handler = None
            for h in handles:
                h.remove()


def _skipped(reason: str, t0: float) -> dict:
    return {"skipped": reason, "adopted": False, "seconds": time.perf_counter() - t0}


@timed_call("value refit")
def refit_values(adapter, layer, inputs, target, device, iterations: int, fit_bias: bool, damp: float,
                 batch_bytes: int | None = None, row_damp: float | None = None) -> dict:
    """Refit the kept value rows of ``layer``'s attention with its output projection (the module
    docstring's alternating closed forms, ``iterations`` of them) toward ``target(c)`` (the attention's
    target on chunk ``c``, [..., d]) on the pruned inputs ``inputs`` (LayerInputs). ``batch_bytes``:
    what one batch of KV groups may hold (engine/budget.py ``VALUE_BATCH_BYTES`` by default).
    ``damp`` dampens ``o_proj``'s refits, ``row_damp`` (default ``damp``) the value rows' ridge toward
    their current values.

    Keeps the result only if its exact calibration error is lower; returns ``{"error_before",
    "error_after", "error_refit", "adopted", "tokens", "group_batches", "passes", "workspace_bytes",
    "seconds"}`` (``workspace_bytes``: engine/budget.py's estimate of the matrices alive at once; errors
    as sums of squares: the plain refit's, the layer's now, the new rows' with o_proj refitted), or
    ``{"skipped": why, ...}`` where the attention cannot be captured this way."""
    t0 = time.perf_counter()
    row_damp = damp if row_damp is None else row_damp
    rows = adapter.value_rows(layer)
    if rows is None:
        return _skipped("no value rows: the adapter exposes no v slice of the fused projection", t0)
    sweep = _Sweep(adapter, layer, inputs, device)
    if sweep.fn is None:
        return _skipped("no eager attention function in the family's modeling module", t0)
    wv, bv = rows
    vb = bv is not None
    shape = adapter.attention_shape(layer)
    K, dh, d = shape.num_kv_heads, shape.head_dim, wv.shape[1]
    n_rep = shape.num_heads // K
    e = d + vb  # width of Y_h = [P_h X, 1]
    o = adapter.attn_linears(layer)[1]
    Wo0 = o.weight.detach().double()
    c0 = None if o.bias is None else o.bias.detach().double()
    V0 = wv.detach().double()
    if vb:
        V0 = torch.cat([V0, bv.detach().double()[:, None]], 1)
    V0 = V0.to(device)
    dout, k = Wo0.shape
    first = inputs.hidden[0]
    chunk_tokens = max(distributed.gather_objects(first.numel() // first.shape[-1]))
    batches = value_batches(K, n_rep, d, chunk_tokens, batch_bytes)
    # Later iterations reuse the Grams' factors: in RAM with one batch (it fits), else in a store.
    keep_factors = iterations > 1
    factors = ActivationStore() if keep_factors and len(batches) > 1 else []
    ridges: list[float] = []

    def out_of(z, W, c):
        y = z @ W.T.to(z.dtype)
        return y if c is None else y + c.to(z.dtype)

    V, Wo, c = V0, Wo0, c0
    err0, count, passes = [], 0, 0
    try:
        for it in range(iterations):
            # q-step factor: float32, alpha W_o^T W_o + gamma I is well conditioned (gamma I)
            Wf = Wo.to(device, torch.float32)
            L = torch.linalg.cholesky(ALPHA * (Wf.T @ Wf) + GAMMA * torch.eye(k, device=device))
            acc = StatsAccumulator(gram=True)  # W_o-step statistics of q against t
            cross = torch.zeros(K, dh, e, dtype=torch.float64, device=device)

            def q_step(z, ci):
                t = as_tokens(target(ci), device)
                resid = t if c is None else t - c.to(device, torch.float32)
                rhs = ALPHA * (resid @ Wf) + GAMMA * z
                return torch.cholesky_solve(rhs.T, L).T, t  # [tokens, k]

            # The first iteration also sweeps the Grams, one capture per batch of groups; its first
            # sweep (like every later iteration's only one) does the q-step and the cross terms.
            for bi, groups in enumerate(batches if it == 0 else [None]):
                grams = [torch.zeros(e, e, dtype=torch.float64, device=device) for _ in groups] if groups else []

                def on_chunk(ci, call, groups=groups, bi=bi, grams=grams):
                    nonlocal count
                    if bi == 0:
                        seen = {}

                        def aux(z):
                            seen["q"], seen["t"] = q_step(z, ci)
                            return seen["q"]
                        z, q, C = call.outputs_and_cross(V, vb, aux)
                        t = seen["t"]
                        if it == 0:
                            err0.append(float((t - out_of(z, Wo, c)).pow(2).sum()))
                            count += t.shape[0]
                        acc.add_z("attn", q, dout, target=t)
                        cross.add_(C.double())
                    if groups:
                        Y = call.mixed_inputs(groups, vb)  # [tokens, heads of groups, e]
                        for j in range(len(groups)):
                            Yg = Y[:, j * n_rep:(j + 1) * n_rep].reshape(-1, e)
                            grams[j] += (Yg.T @ Yg).double()

                try:
                    sweep.run(on_chunk)
                except _Missed:
                    return _skipped("the attention does not call transformers' attention function", t0)
                passes += 1
                distributed.sum_tensors(grams + ([cross] if bi == 0 else []))
                if bi == 0:
                    V_old, V = V, V.clone()
                for j, g in enumerate(groups or range(K)):
                    if it == 0:
                        ridge = row_damp * float(torch.diagonal(grams[j]).mean().clamp_min(1e-12))
                        grams[j].diagonal().add_(ridge)
                        F = torch.linalg.cholesky(grams[j])
                        grams[j] = None  # the factor replaces the Gram
                        ridges.append(ridge)
                        if keep_factors:
                            factors.append(F)
                    else:
                        F = factors[g].to(device)
                    rs = slice(g * dh, (g + 1) * dh)  # ridge toward the current rows
                    V[rs] = torch.cholesky_solve((cross[g] + ridges[g] * V_old[rs]).T, F).T
                    del F
                del grams
            st = acc.finish()["attn"]
            Wo, c = refit(st.gram, st.zsum, st.count, torch.arange(k, device=st.gram.device), C=st.C, W=Wo, bias=c,
                          fit_bias=fit_bias, damp=damp)
            Wo = Wo.double()
            c = c0 if c is None else c.double()
    finally:
        if isinstance(factors, ActivationStore):
            factors.close()
    err0 = distributed.fsum_parts(err0)
    count = sum(distributed.gather_objects(count))
    # The exact problem for the new rows: W_o, c refitted on the true outputs z of the new rows.
    final = StatsAccumulator(gram=True)
    sweep.run(lambda ci, call: final.add_z("attn", call.outputs(V, vb), dout, target=as_tokens(target(ci), device)))
    st = final.finish()["attn"]
    W1, c1 = refit(st.gram, st.zsum, st.count, torch.arange(k, device=st.gram.device), C=st.C, W=Wo0, bias=c0,
                   fit_bias=fit_bias, damp=damp)
    del st
    W1 = W1.double()
    c_use = c0 if c1 is None else c1.double()
    err1 = []
    sweep.run(lambda ci, call: err1.append(float((as_tokens(target(ci), device)
                                                  - out_of(call.outputs(V, vb), W1, c_use)).pow(2).sum())))
    err1 = distributed.fsum_parts(err1)
    passes += 2
    adopted = iterations > 0 and err1 < err0
    if adopted:
        with torch.no_grad():
            wv.copy_(V[:, :d].to(wv.dtype))
            if vb:
                bv.copy_(V[:, d].to(bv.dtype))
            set_output_projection(o, W1, c1)
    return {"error_before": err0, "error_after": err1 if adopted else err0, "error_refit": err1, "adopted": adopted,
            "tokens": count,
            "group_batches": len(batches), "passes": passes,
            "workspace_bytes": value_refit_bytes(K, n_rep, dh, d, chunk_tokens, batch_bytes),
            "seconds": time.perf_counter() - t0}


__all__ = ["ALPHA", "GAMMA", "PROBE", "refit_values"]
