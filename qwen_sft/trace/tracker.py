"""Peak memory of one training step, by category, from torch's MemTracker (works on fake and real tensors).

    tracker = PeakTracker(regions=RegionHooks(decoder))  # inside the fake mode, or on real tensors
    tracker.track_external(model, optimizer)
    with tracker:
        tracker.phase = "forward"; loss = model(**batch).loss
        tracker.phase = "backward"; loss.backward()
        tracker.phase = "optimizer"; optimizer.step(); optimizer.zero_grad(set_to_none=True)
    print(tracker.peak_bytes, tracker.peak_breakdown, tracker.phase_peaks)

Three changes to ``torch.distributed._tools.mem_tracker.MemTracker`` (torch 2.13):
- gradient hooks only on parameters that require grad (MemTracker registers one on every parameter and
  fails on the frozen base of a LoRA model);
- only the global peak is updated per op (MemTracker walks every tracked module on every op: ~30 min for
  48 layers), and with it the live bytes per category at that moment;
- every storage is rounded up to the CUDA caching allocator's 512 bytes on every device, so a fake CPU trace
  counts what ``torch.cuda.max_memory_allocated`` counts.
Each storage is labelled when it is first seen: its MemTracker type (parameter, gradient, activation,
backward temporary, optimizer) plus where the step was (inside a decoder layer, at the loss, in the optimizer
step), which gives the breakdown at the peak.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn
from torch.distributed._tools import mem_tracker as mt
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType, _UpdateType, _WeakRefInfo

ALLOC_ROUND = 512  # bytes: the CUDA caching allocator's smallest block

# Breakdown rows, in print order.
CATEGORIES = (
    "parameters (frozen)", "parameters (trainable)", "gradients", "optimizer state", "activations (layers)",
    "activations (embeddings, mask, rope)", "loss/logits", "transients (backward, loss)",
    "transients (backward, layers)", "transients (optimizer step)", "other (inputs)",
)


class _RoundedInfo(_WeakRefInfo):
    """A storage's bytes as the caching allocator would count them."""

    category = "other (inputs)"

    def _calculate_mem_consumed(self) -> int:
        return math.ceil(self.size * self.element_size / ALLOC_ROUND) * ALLOC_ROUND


class RegionHooks:
    """Where the forward is: inside a decoder layer, or past the final norm (the LM head and the loss)."""

    def __init__(self, layers: list[nn.Module], final_norm: nn.Module | None) -> None:
        self.in_layer = 0
        self.after_norm = False
        self._handles = []
        for layer in layers:
            self._handles.append(layer.register_forward_pre_hook(lambda *_: self._enter()))
            self._handles.append(layer.register_forward_hook(lambda *_: self._leave()))
        if final_norm is not None:
            self._handles.append(final_norm.register_forward_hook(lambda *_: setattr(self, "after_norm", True)))

    def _enter(self) -> None:
        self.in_layer += 1

    def _leave(self) -> None:
        self.in_layer -= 1

    def reset(self) -> None:
        self.in_layer, self.after_norm = 0, False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class PeakTracker(MemTracker):
    """MemTracker with the changes in the module docstring. ``phase`` is set by the caller."""

    def __init__(self, regions: RegionHooks | None = None, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.regions = regions
        self.device = torch.device(device)
        self.phase = "setup"
        self.live: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.peak_bytes = 0
        self.peak_breakdown: dict[str, int] = dict(self.live)
        self.peak_phase = ""
        self.phase_peaks: dict[str, int] = {}
        self.phase_breakdowns: dict[str, dict[str, int]] = {}
        self.start_bytes = 0
        self.other_devices: dict[str, int] = {}  # e.g. activations offloaded to the host ("meta" in a trace)
        self.other_peaks: dict[str, int] = {}  # the most each of those devices held at once during the step
        self._trainable: weakref.WeakSet = weakref.WeakSet()

    # --- labelling -------------------------------------------------------------------------------------
    def _category(self, reftype, tensor: torch.Tensor | None) -> str:
        if reftype == _MemRefType.PARAM:
            return "parameters (trainable)" if tensor is not None and tensor.requires_grad else "parameters (frozen)"
        if reftype == _MemRefType.BUFFER:
            return "parameters (frozen)"
        if reftype == _MemRefType.GRAD:
            return "gradients"
        if reftype == _MemRefType.OPT:
            return "transients (optimizer step)" if self._in_opt else "optimizer state"
        in_layer = self.regions is not None and self.regions.in_layer > 0
        if reftype == _MemRefType.TEMP:
            layers = in_layer or any(".layers." in p for p in self._mod_tracker.parents)
            return "transients (backward, layers)" if layers else "transients (backward, loss)"
        if reftype == _MemRefType.ACT:
            if self._mod_tracker.is_bw or in_layer:  # recomputed by checkpointing, or saved in a layer
                return "activations (layers)"
            if self.regions is not None and self.regions.after_norm:
                return "loss/logits"
            return "activations (embeddings, mask, rope)"
        return "other (inputs)"

    def _new_info(self, st: torch.UntypedStorage, t: torch.Tensor, reftype) -> _RoundedInfo:
        winfo = _RoundedInfo(st.size(), st.element_size(), t.device, reftype)
        winfo.category = self._category(reftype, t)
        w_st = weakref.ref(st, lambda _, w=winfo: self._delete_callback(w, None))
        self._WINFO[st] = (winfo, w_st)
        if winfo.mem_consumed > 0:
            self._update_snap(_UpdateType.ADD, winfo)
        return winfo

    def _recategorize(self, winfo: _RoundedInfo, category: str) -> None:
        if winfo.device == self.device and winfo.category != category:
            self.live[winfo.category] -= winfo.mem_consumed
            self.live[category] += winfo.mem_consumed
        winfo.category = category

    def _update_snap(self, u_type, winfo, old_mem_consumed=None, old_reftype=None) -> None:
        super()._update_snap(u_type, winfo, old_mem_consumed=old_mem_consumed, old_reftype=old_reftype)
        if winfo.device != self.device:
            key = str(winfo.device)
            delta = {_UpdateType.ADD: winfo.mem_consumed, _UpdateType.DEL: -winfo.mem_consumed,
                     _UpdateType.SIZE: winfo.mem_consumed - (old_mem_consumed or 0)}.get(u_type, 0)
            self.other_devices[key] = self.other_devices.get(key, 0) + delta
            self.other_peaks[key] = max(self.other_peaks.get(key, 0), self.other_devices[key])
            return
        if u_type == _UpdateType.ADD:
            self.live[winfo.category] += winfo.mem_consumed
        elif u_type == _UpdateType.DEL:
            self.live[winfo.category] -= winfo.mem_consumed
        elif u_type == _UpdateType.SIZE:
            self.live[winfo.category] += winfo.mem_consumed - old_mem_consumed
        elif u_type == _UpdateType.REF and winfo.reftype == _MemRefType.GRAD:
            self._recategorize(winfo, "gradients")

    # --- MemTracker overrides --------------------------------------------------------------------------
    def _update_and_maybe_create_winfos(self, t, reftype, update_existing=False):
        winfos = set()
        for st in mt.get_untyped_storages(t):
            winfo, _ = self._WINFO.get(st, (None, None))
            if winfo is None:
                if update_existing:
                    raise KeyError("No existing winfo found")
                winfo = self._new_info(st, t, reftype)
            elif winfo.reftype != reftype:
                old = winfo.reftype
                winfo.reftype = reftype
                self._update_snap(_UpdateType.REF, winfo, old_reftype=old)
            winfos.add(winfo)
        return winfos

    def _track(self, reftype, t: torch.Tensor) -> None:
        for st in mt.get_untyped_storages(t):
            winfo, _ = self._WINFO.get(st, (None, None))
            if winfo is None:
                self._new_info(st, t, reftype)
            elif winfo.size != st.size():
                old = winfo.mem_consumed
                winfo.update_mem_consumed(st)
                self._update_snap(_UpdateType.SIZE, winfo, old_mem_consumed=old)

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        def grad_hook(grad: torch.Tensor) -> None:
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        param_memory = buffer_memory = 0
        for param in module.parameters():
            param_memory += sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(param, _MemRefType.PARAM))
            if param.grad is not None:
                self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
            # The change: hooks only where gradients flow (register_hook raises on frozen parameters).
            if install_grad_hooks and param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                self._param_to_grad_hook_handles[param] = (
                    param.register_hook(grad_hook),
                    param.register_post_accumulate_grad_hook(lambda p: grad_hook(p.grad)))
        for buffer in module.buffers():
            buffer_memory += sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER))
        return param_memory, buffer_memory

    def _pre_fw_hook(self, module: nn.Module, inputs) -> None:
        # MemTracker refuses a root-level module called a second time in forward (it takes it for the next
        # iteration). The chunked loss calls the lm_head once per chunk outside any module; only the global
        # peak is used here, so a repeated call is simply not tracked per module again.
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            name = self._mod_tracker.get_known_fqn(module)
            if set(self._mod_tracker.parents) - {name} == {"Global"}:
                return
        super()._pre_fw_hook(module, inputs)

    def _track_optimizer_states(self, reftype, optimizer) -> None:
        for states in optimizer.state.values():
            for val in states.values():
                if isinstance(val, torch.Tensor):
                    for winfo in self._update_and_maybe_create_winfos(val, reftype):
                        self._recategorize(winfo, "optimizer state")

    def _update_peak_stats(self, peak_state) -> None:
        total = self._curr_mem_snap.get(self.device, {}).get(mt._TOTAL_KEY, 0)
        if total > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = total
            self.phase_breakdowns[self.phase] = dict(self.live)
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_breakdown, self.peak_phase = total, dict(self.live), self.phase

    def __enter__(self) -> PeakTracker:
        super().__enter__()
        self.start_bytes = self._curr_mem_snap.get(self.device, {}).get(mt._TOTAL_KEY, 0)
        self.peak_bytes, self.peak_breakdown, self.peak_phase = self.start_bytes, dict(self.live), self.phase
        return self

    def label(self, tensors: list[torch.Tensor], category: str) -> None:
        """Count already-tracked ``tensors`` under ``category`` (e.g. NF4 scales held by a quant state)."""
        for t in tensors:
            for winfo in self._update_and_maybe_create_winfos(t, _MemRefType.BUFFER):
                self._recategorize(winfo, category)

    def current_bytes(self) -> int:
        return self._curr_mem_snap.get(self.device, {}).get(mt._TOTAL_KEY, 0)

