"""The core of the server: register, execute, describe. It knows nothing of gRPC."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from fuseport.server.artifacts import ArtifactCache
from fuseport.server.batching import Batcher
from fuseport.server.calls import Call, Result, light_work
from fuseport.server.checks import OVERFLOW_BYTES, DataError, OutOfTime, Plan, device_capacity, time_limits
from fuseport.server.compile import make_compiler
from fuseport.server.devices import (
    Placement,
    break_device,
    is_device_failure,
    is_out_of_memory,
    resolve_device,
)
from fuseport.server.executor import Executor, Outcome, State
from fuseport.server.intake import example_args
from fuseport.server.penalties import TOKEN_IDENTITY, Penalties
from fuseport.server.registry import Kernel, Quotas, Registry, Summary, Variant
from fuseport.server.resident import NO_OWNER, Owner, Residents
from fuseport.server.settings import Settings
from fuseport.server.shm import SharedCall, SharedMemory, check_slot, default_page_lock_bytes, shared_sizes
from fuseport.server.streams import Hold, StreamBuffers, default_buffer_bytes
from fuseport.server.tenants import Tenants
from fuseport.server.watchdog import Watch, Watchdog, past_limit
from fuseport.wire import _pb, shm
from fuseport.wire.codec import Buffer, Handle, encode_stack, message_room
from fuseport.wire.errors import (
    DeadlineExceeded,
    ExecutionFailed,
    FuseportError,
    InternalError,
    KernelNotFound,
    NoMatchingVariant,
    PermissionDenied,
    ResourceExhausted,
    ResultTooLarge,
    SignatureMismatch,
    Unavailable,
)
from fuseport.wire.graph import InputSpec, Signature

__all__ = ["Call", "Core", "Result"]

_NOT_HOLDING = contextlib.nullcontext()  # stateless: one for every call

log = logging.getLogger(__name__)

_DECIMAL = re.compile(r"-?[0-9]{1,20}")
# Sizes at which `Core.outputs` plans a graph, in pairs: an output dim that differs
# between the two of a pair follows the inputs' sizes (-1). Several pairs, for
# graphs whose conditions refuse the small ones.
_EXAMPLE_SIZES = ((2, 3), (4, 5), (8, 9), (16, 17), (64, 65))
class Core:
    def __init__(self, settings: Settings, *, shared_store: bool = False) -> None:
        """`shared_store`: other serving processes register and unregister in the same store
        (`--processes`): see the registry's module doc."""
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.capacity = device_capacity(self.device)
        self.placement = Placement(self.device, staging_bytes=settings.cuda_staging_bytes)
        self.registry = Registry(
            settings.store_dir,
            self.device,
            Quotas(
                max_variants=settings.max_variants,
                max_graph_bytes=settings.max_graph_bytes,
                max_store_bytes=settings.max_store_bytes,
                max_store_kernels=settings.max_store_kernels,
            ),
            shared=shared_store,
            capacity=self.capacity,
        )
        compiler = None
        if settings.compile_mode != "off":
            compiler = make_compiler(
                settings.compiler,
                self.placement,
                settings.compile_mode,
                artifacts=(
                    ArtifactCache(settings.artifact_path, settings.artifact_cache_bytes)
                    if settings.compiler == "standalone"
                    else None
                ),
                timeout=settings.compile_timeout_seconds,
                budget=settings.max_call_seconds,
                threads=settings.compile_threads,
            )
        self.executor = Executor(
            self.placement,
            compile_mode=settings.compile_mode,
            max_kernels=settings.max_kernels,
            max_arg_specs=settings.max_arg_specs,
            compiler=compiler,
        )
        self._outputs: dict[int, tuple[InputSpec | None, ...] | None] = {}  # variant key -> Core.outputs
        self.residents = Residents(
            self.device,
            lease_seconds=settings.handle_lease_seconds,
            budget_bytes=settings.max_resident_bytes,
            quota_bytes=settings.max_resident_bytes_per_client,
            max_handles=settings.max_handles_per_client,
            token_quota_bytes=settings.max_resident_bytes_per_token,
            token_max_handles=settings.max_handles_per_token,
        )
        # Set by the app: called (from a worker thread) when the device fails.
        self.on_device_failure: Callable[[], None] | None = None
        # Calls past their deadline or budget, and kernels that will not stop (server/watchdog.py).
        # A single process retires for --max-call-seconds only (see Watchdog).
        self.watchdog = Watchdog(settings.overrun_grace_seconds, self._runaway, retire_on_deadline=shared_store)
        # Set by the app: called (from the watchdog's thread) when a kernel runs away.
        self.on_runaway: Callable[[], None] | None = None
        # Whose kernel ran away is refused heavy calls for a while, on every process of the store.
        self.penalties = Penalties(Path(settings.store_dir) / "penalties", settings.runaway_penalty_seconds)
        # Once the device failed, every call is refused (see _device_failed).
        self.device_failed = False
        self._failure_lock = threading.Lock()
        self._injecting = 0  # deliberate faults (inject_device_fault) under way
        self.registry.on_removed = self._forget
        self.registry.load()
        self.tenants = Tenants(self.registry, self._tenant_registry, shared_store=shared_store)
        # Shared memory for co-located clients (server/shm.py): the app starts its socket.
        self.shared = SharedMemory(
            settings.shared_memory,
            settings.shared_memory_max_bytes,
            # CUDA IPC only where this process serves on CUDA: asking a CPU
            # server's driver for device UUIDs would make it a CUDA context.
            self.placement.device if settings.cuda_ipc and self.placement.device.type == "cuda" else None,
            page_lock=self.placement.device if self.placement.device.type == "cuda" else None,
            page_lock_bytes=(
                default_page_lock_bytes()
                if settings.shared_memory_page_lock_bytes is None
                else settings.shared_memory_page_lock_bytes
            ),
            max_sessions=settings.shared_memory_sessions,
            per_identity=settings.shared_memory_sessions_per_identity,
            ticket_seconds=settings.shared_memory_ticket_seconds,
            idle_seconds=settings.shared_memory_idle_seconds,
        )
        # What streamed calls still arriving hold (server/streams.py).
        buffer_limit = settings.max_stream_buffer_bytes or default_buffer_bytes()
        self.stream_buffers = StreamBuffers(
            buffer_limit, settings.max_stream_buffer_bytes_per_token or max(1, buffer_limit // 2)
        )
        # Dynamic batching (server/batching.py), when its window is not 0.
        self.batcher: Batcher | None = None
        if settings.batch_window_us > 0 and settings.max_batch > 1:
            self.batcher = Batcher(self, settings.batch_window_us, settings.max_batch)

    # ------------------------------------------------------------------ RPCs

    def register(
        self,
        graph: _pb.graph.Graph,
        variant_of: int | None = None,
        alias: str | None = None,
        batching: bool | None = None,
        tenant: bytes = b"",
        datas: Sequence[Buffer] | None = None,
    ) -> tuple[int, bool, int]:
        """(kernel key, created, the graph's own key), in `tenant`'s namespace
        (server/tenants.py; b"": the shared one). `batching`: False keeps the
        kernel's calls out of batches (stored with it), True lets them in again, None: unchanged.
        `datas`: the constants' data when `graph` was decoded without it (Registry.register)."""
        if tenant and variant_of is not None:
            own = self.tenants.own(tenant)
            if (own is None or not own.knows(variant_of)) and self.registry.knows(variant_of):
                raise PermissionDenied(
                    f"kernel {variant_of} is shared (an admin registered it): only an admin adds variants to it; "
                    "register its graph as your own kernel first (the same key), then add variants to that"
                )
        registry = self._own(tenant)
        key, created, vkey = registry.register(graph, variant_of, alias, datas)
        if batching is not None and registry.set_batching(key, batching) and self.batcher is not None:
            batched = self.batcher.forget([v.key for v in registry.get(key).variants])
            self.executor.forget(key, batched)
        return key, created, vkey

    def batching_off(self, key: int, registry: Registry | None = None) -> str:
        """Why no call of kernel `key` is batched, whatever its graph; "" when calls may be."""
        if self.batcher is None:
            return "batching is off on this server (--batch-window-us 0)"
        if not (registry or self.registry).batching_enabled(key):
            return "the kernel was registered with batching=False"
        return ""

    def adopt(
        self, key: int, graphs: Sequence[_pb.graph.Graph], alias: str | None = None, tenant: bytes = b""
    ) -> int:
        """Registers the graphs an Execute/Fallback carries for `key` before it
        runs (a replica that lacks the kernel), with Register's checks and quotas."""
        return self._own(tenant).adopt(key, graphs, alias)

    def execute(
        self,
        key: int,
        stack: list[Any],
        *,
        fused: bool = True,
        wait: bool = False,
        deadline: float | None = None,
        variants: Sequence[int] = (),
        transport: str = "unary",
        owner: Owner = NO_OWNER,
        keep: bool = False,
        answer: Callable[[FuseportError], None] | None = None,
        shared: SharedCall | None = None,
        who: bytes = b"",
    ) -> Result:
        """runFusion / runFallback: pops the kernel's inputs off the top of the
        stack, pushes its outputs; the values below come back untouched.

        Before either path runs: the first variant (of `variants`, when given)
        that covers the inputs is chosen, its plan for these sizes is checked
        (shape errors, result size, index inputs, the call's budget), the same
        for both paths. The result's bound is the `transport`'s (see _check_budget).
        `answer`: see `run`. With `shared`, the stack's shared-memory tensors are
        copied out of the caller's session first, and with its slot the results
        are placed there after (checked against the session's room, not one message).
        `who`: the caller's identity, for runaway penalties (see `prepare`)."""
        if shared is not None:
            stack = self._read_shared(owner, shared, stack)
        to_slot = shared is not None and bool(shared.slot) and not keep
        call = self.prepare(
            key, stack, fused=fused, variants=variants, transport="shm" if to_slot else transport, owner=owner,
            keep=keep, who=who, views=shared.views if shared is not None else None,
        )  # fmt: skip
        if to_slot and call.plan.outputs is not None:
            assert shared is not None
            self.shared.check_results(
                owner, shared.session, shared.slot, [*call.below, *call.plan.outputs],
                self.settings.max_message_bytes, shared.fresh_output, shared.cuda_outputs,
            )  # fmt: skip
        # Results for the slot's region stay on the device until place() copies them there
        # (into page-locked memory: DMA), not through a pinned buffer of torch's first.
        call.on_device = to_slot
        result = self.run(call, wait=wait, deadline=deadline, answer=answer)
        if shared is not None and shared.slot:
            started = time.perf_counter_ns()
            try:
                result.stack = self.shared.place(
                    owner, shared.session, shared.slot, result.stack, shared.fresh_output, shared.cuda_outputs
                )
                if to_slot and self.placement.cuda and _holds_tensors(result.stack):
                    # What place() left as tensors (over the session's budget) travels as bytes.
                    result.stack = self.placement.to_host(result.stack)
                    self.placement.synchronize()
            except BaseException:
                self.release_handles(owner, result.kept)  # a call that fails keeps nothing
                raise
            shared.place_ns = time.perf_counter_ns() - started
        return result

    def _read_shared(self, owner: Owner, shared: SharedCall, stack: list[Any]) -> list[Any]:
        """The stack with its shared-memory tensors made tensors: on a device, copies
        there; on the CPU, views of the caller's regions (`shared.views`), of which
        `prepare` copies what a check reads (`_own_inputs`; see server/shm.py)."""
        started = time.perf_counter_ns()
        check_slot(shared.slot)  # before running, not after
        # Sizes first, as a stream's header: refused before anything is copied.
        self.check_inputs(shared_sizes(stack), "shared-memory stack")
        stack = self.shared.resolve(owner, shared.session, stack, self.placement.device, shared.views)
        shared.read_ns = time.perf_counter_ns() - started
        return stack

    def prepare(
        self,
        key: int,
        stack: list[Any],
        *,
        fused: bool = True,
        variants: Sequence[int] = (),
        transport: str = "unary",
        owner: Owner = NO_OWNER,
        keep: bool = False,
        planned_only: bool = False,
        who: bytes = b"",
        views: dict[int, torch.Tensor] | None = None,
    ) -> Call | None:
        """Everything `execute` does before a kernel runs: no kernel runs here, and
        with `planned_only` no planning and no reading of the store either: None
        when these sizes were never planned or the kernel is not built, so that a
        caller on the event loop hands the call on. `views`: inputs still in a
        client's shared-memory region (by id()); those the plan's checks read are
        copied before they are checked (`_own_inputs`).

        `who` (the caller's identity: its token, or its host) is refused its calls
        while one of its kernels' runaways is penalised (server/penalties.py): a
        token all of them, a host those that are not light."""
        if self.device_failed:  # admitted before the server began to drain
            raise self._device_gone()
        start = time.perf_counter_ns()
        registry = self.tenants.find(owner.tenant, key) if owner.tenant else self.registry
        if planned_only:
            built = registry.peek(key)
            if built is None:
                return None
            kernel = built
        else:
            kernel = registry.get(key)
        n = kernel.arity
        if len(stack) < n:
            raise SignatureMismatch(
                f"kernel {key} takes {n} input{'s' * (n != 1)} but the stack holds "
                f"{len(stack)} value{'s' * (len(stack) != 1)}"
            )
        base = len(stack) - n
        values = stack[base:]
        handles = any(self.residents.has_handles(v) for v in values)
        if handles:
            values = [self.residents.resolve(owner, v, f"stack[{base + i}]") for i, v in enumerate(values)]
            with self.placement.request_scope():
                self.placement.adopt(values)  # the checks below may read them on this thread's stream
        try:
            variant, args = _select(kernel, values, base, variants)
        except NoMatchingVariant:
            if planned_only:
                return None  # the worker looks again, and may read the store
            # A shared store: another process may have added the variant that covers it.
            newer = registry.refresh(key)
            if newer is None or len(newer.variants) == len(kernel.variants):
                raise
            variant, args = _select(newer, values, base, variants)
        plan = variant.planner.plan(args, cached_only=planned_only)
        if plan is None:
            return None
        if plan.error is not None:
            raise ExecutionFailed(f"kernel {key} failed on these inputs: {plan.error}")
        self._check_budget(key, plan, args, transport, keep, _response_bytes(stack[:base]), handles)
        if who and (who.startswith(TOKEN_IDENTITY) or not light_work(plan)):
            # A penalised token is refused every call: a plan may take for light what is
            # not. Without tokens the identity is a host, where other callers may be:
            # they keep their light calls (see server/penalties.py).
            self.penalties.check(who, key)
        if keep:
            self.residents.check_room(owner, plan.output_bytes or 0, f"kernel {key}")
        if views:
            args = _own_inputs(plan, args, views, keep)
        try:
            plan.check_inputs(args, variant.module)
        except DataError as e:
            raise ExecutionFailed(f"kernel {key} failed on these inputs: {e}") from None
        return Call(
            key, stack[:base], variant, args, plan, fused, owner, keep, start, time.perf_counter_ns() - start,
            handles=handles, who=who,
        )  # fmt: skip

    def light(self, call: Call) -> bool:
        """Whether the call's planned work is small enough to run where waiting
        for it holds other calls up (the event loop): the plan bounds every byte
        its ops touch and every matrix product's arithmetic, for these sizes,
        whatever the kernel's earlier calls took. A fused kernel not yet loaded
        (an ArgSpec this process has not met) is not light: loading takes milliseconds."""
        if not light_work(call.plan):
            return False
        if self.placement.held:
            # A heavy kernel (or a compile's run) holds the device: a small one queued behind
            # it would hold the loop waiting for it, seconds maybe; a worker waits instead.
            return False
        if call.fused and self.settings.compile_mode != "off" and not call.plan.unfused:
            entry = self.executor.known(call.variant, call.args)
            # A torch.compile kernel (in process) may recompile on a guard failure: seconds.
            if entry is None or (entry.compiled is not None and entry.compiled.dynamo):
                return False
            call.entry = entry
        return True

    def run(
        self,
        call: Call,
        *,
        wait: bool = False,
        deadline: float | None = None,
        answer: Callable[[FuseportError], None] | None = None,
    ) -> Result:
        """Runs a prepared call: the fused kernel or the fallback, results to the host or kept.

        `answer`, given for a call run off the event loop: how to answer its caller
        at once should its deadline or --max-call-seconds pass while its kernel
        still runs (called from the watchdog's thread; the kernel runs on, what it
        returns is dropped, and past --overrun-grace-seconds the process retires):
        see server/watchdog.py. A light call (on the loop, or batched) is not
        watched: its plan bounds its work below a millisecond. Without `answer` (on
        the loop) a light call that keeps its results returns before its kernel ends
        (see below), so its inputs must be this thread's stream's or adopted ones."""
        key, args, owner, keep = call.key, call.args, call.owner, call.keep
        started = time.perf_counter_ns()
        budget = self.settings.max_call_seconds
        watch: Watch | None = None
        # Past the light bound, on CUDA: light calls stay off the loop while it runs. On the
        # CPU nothing is counted, and the small call's path asks nothing more than before.
        heavy = self.placement.cuda and not light_work(call.plan)
        holding = self.placement.holding() if heavy else _NOT_HOLDING
        try:
            with holding, self.placement.request_scope():
                if call.handles:
                    self.placement.adopt(args)  # prepared on another thread maybe (the loop)
                device_args = self.placement.to_device(args)
                entry = call.entry
                if wait and entry is None and call.fused and not call.plan.unfused:
                    # Waiting for a compile is not running: the call's time limits count from after it.
                    entry = self.executor.wait_compiled(key, call.variant, device_args, deadline)
                now = time.monotonic()
                if deadline is not None and now > deadline:
                    # It waited (for a worker, a compile) past its deadline: nothing runs now.
                    raise DeadlineExceeded(f"kernel {key}: the call's deadline passed before it ran")
                budget_end = now + budget if budget else None
                if answer is not None:
                    watch = self.watchdog.watch(key, deadline, budget_end, budget, answer, call.who)
                with time_limits(deadline, budget_end):
                    outcome: Outcome = self.executor.run(
                        key, call.variant, device_args, fused=call.fused, unfused=call.plan.unfused,
                        wait=wait, deadline=deadline, entry=entry,
                    )  # fmt: skip
                del device_args
                if watch is not None:
                    # The kernel's whole time, on a device too (a launch returns at once), is
                    # watched; and results its caller no longer waits for are dropped here,
                    # before any is kept as a resident value or copied for sending.
                    self.placement.synchronize()
                    if not self.watchdog.finish(watch):
                        del outcome
                        raise _Overran(watch)
                if keep:
                    # CUDA graphs (these two modes) reuse their output memory on the next
                    # replay: a kept output must be a copy (to_host copies anyway).
                    copy = (
                        outcome.path == _pb.service.PATH_FUSED
                        and self.placement.cuda
                        and self.settings.compile_mode in ("reduce-overhead", "max-autotune")
                    )
                    made = self.placement.made()
                    outputs = self.residents.keep(
                        owner, outcome.outputs, args, f"kernel {key}", copy=copy, mark=made and made.mark
                    )
                    if made is not None and answer is None and not heavy:
                        # On the event loop, nothing to the host: the answer need not wait for
                        # the device. The next call on this stream is queued behind this one, and
                        # a use on another stream waits for `made` (Placement.adopt). Only here:
                        # the loop's inputs were made on its stream (decoded, then copied) or
                        # adopted; a worker's may be another stream's memory (a streamed stack's
                        # sink, shared memory), freed when the call returns while this stream's
                        # kernel may still read it. A heavy call waits: while it runs, it holds
                        # light calls off the loop (Placement.holding).
                        made.unwaited()
                    else:
                        self.placement.synchronize()
                else:
                    outputs = outcome.outputs if call.on_device else self.placement.to_host(outcome.outputs)
                    self.placement.synchronize()
        except _Overran as e:
            log.info("kernel %d: its run ended %.2f s after its call was answered; the results were dropped",
                     key, time.monotonic() - e.watch.limit)  # fmt: skip
            raise e.watch.error() from None
        except OutOfTime as e:
            # The unfused graph stopped between two ops; what it made is dropped. Said
            # here too: a caller whose deadline passed is gone and hears nothing.
            log.info("kernel %d: stopped between two ops, the %s", key, e)
            raise past_limit(key, budget if e.budget else 0.0) from None
        except Exception as e:
            if is_device_failure(e):
                self._device_failed(e)
            if not is_out_of_memory(e):
                raise
            # Out of memory moving inputs or results (the executor handles its own).
            self.placement.release_memory()
            raise ResourceExhausted(
                f"{self.device} out of memory moving data for kernel {key}; memory was released"
            ) from e
        finally:
            if watch is not None:
                self.watchdog.finish(watch)
        # run_us covers choosing the variant and checking the inputs too (not the
        # wait between preparing and running: that is queue_us): every microsecond
        # the server spends is in exactly one of the call's timings.
        run_us = (call.prepare_ns + time.perf_counter_ns() - started) // 1000
        kept = [h.id for h in _handles(outputs)] if keep else []
        return Result(
            call.below + outputs, outcome.path, outcome.reason, outcome.detail, run_us, call.variant.key, kept
        )

    def check_stream(self, sizes: Sequence[int], hold: Hold | None = None) -> None:
        """Refuses a streamed stack from its header alone, before any of it is
        allocated: over --max-stream-bytes, over --max-call-bytes (its inputs alone),
        a tensor larger than the device, or (with `hold`, the stream's share of
        server/streams.py's budget, which then holds the bytes) more than the
        streams still arriving may hold (--max-stream-buffer-bytes, and per token)."""
        total = sum(sizes)
        limit = self.settings.max_stream_bytes
        if total > limit:
            raise ResourceExhausted(
                f"the streamed stack declares {total} bytes, over the {limit} bytes a streamed call may "
                "send (--max-stream-bytes); refused before allocating"
            )
        self.check_inputs(sizes, "streamed stack")
        if hold is not None:
            hold.take(total)

    def check_graph_stream(self, sizes: Sequence[int]) -> None:
        """Refuses a streamed graph (RegisterStream) from its header alone, before any
        of it is allocated: its constants' declared bytes over --max-graph-bytes (the
        whole graph's size, checked again once it is assembled, can only be larger)."""
        total = sum(sizes)
        limit = self.settings.max_graph_bytes
        if total > limit:
            raise ResourceExhausted(
                f"the streamed graph declares {total} bytes of constants; this server takes graphs of at most "
                f"{limit} bytes (--max-graph-bytes); refused before allocating"
            )

    def check_inputs(self, sizes: Sequence[int], what: str) -> None:
        """Refuses a stack from its tensors' declared sizes, before any is
        allocated: over --max-call-bytes (its inputs alone), or a tensor larger
        than the device (a streamed or a shared-memory stack)."""
        total = sum(sizes)
        budget = self.settings.max_call_bytes
        if budget and total > budget:
            raise ResourceExhausted(
                f"the {what} declares {total} bytes, over the {budget} bytes one call may use "
                "(--max-call-bytes); refused before allocating"
            )
        largest = max(sizes, default=0)
        if largest > self.capacity:
            raise ResourceExhausted(
                f"{self.device} out of memory: a tensor of {largest} bytes in the {what} is larger than the "
                f"device's {self.capacity}; refused before allocating"
            )

    def _check_budget(
        self,
        key: int,
        plan: Plan,
        args: Sequence[Any],
        transport: str = "unary",
        keep: bool = False,
        below: int = 0,
        handles: bool = False,
    ) -> None:
        """Refuses, before anything is allocated, what could only fail later or
        take more than one call may.

        The result is bounded by the path it goes back on (`transport`): one
        message ("unary": --max-message-bytes, ResultTooLarge so that the client
        sends the call again as a stream; "kserve": the same limit, and no stream to
        name), a stream ("stream": --max-stream-bytes),
        or nothing here ("shm": the servicer checks the session's room for
        results, which the core does not know). `below`: at most the bytes the values
        below the kernel's inputs take in the response, which they go back in (also with
        `keep`); `handles`: the stack names resident values (no stream can carry it)."""
        if plan.overflow:
            # Checked first: the other checks' numbers would count it as a size the data decides.
            raise ResourceExhausted(
                f"kernel {key}: a tensor of this call would be more than {OVERFLOW_BYTES - 1} bytes (its size "
                f"does not fit 64 bits), more than any device holds: {plan.overflow}; refused before running"
            )
        budget = self.settings.max_call_bytes
        if budget:
            inputs = sum(a.untyped_storage().nbytes() for a in args if isinstance(a, torch.Tensor))
            if plan.peak_bytes is not None:
                # Its inputs, and the most the graph holds at once beside them:
                # intermediates and results by liveness (planned on meta tensors).
                needs = inputs + plan.peak_bytes
                what = f"inputs {inputs}, then at most {plan.peak_bytes} allocated at once"
            else:
                # Planning stopped at a size that depends on data: what is known.
                needs = inputs + (plan.output_bytes or 0) + plan.largest_bytes
                what = f"inputs {inputs}, largest tensor {plan.largest_bytes}; the rest depends on the data"
            if needs > budget:
                raise ResourceExhausted(
                    f"kernel {key}: this call needs at least {needs} bytes ({what}), over the {budget} "
                    "bytes one call may use (--max-call-bytes); refused before running"
                )
        results = 0 if keep else plan.output_bytes
        out = None if results is None else results + below
        sent_back = f" (of which up to {below} are the values below the kernel's inputs, sent back too)" if below else ""
        message = message_room(self.settings.max_message_bytes)
        if out is not None and transport == "stream" and out > self.settings.max_stream_bytes:
            raise ResourceExhausted(
                f"kernel {key}: the result would be {out} bytes{sent_back}, over the streamed result limit of "
                f"{self.settings.max_stream_bytes} bytes (--max-stream-bytes); refused before running"
            )
        if out is not None and transport in ("unary", "kserve") and out > message:
            if transport == "kserve":
                way = (
                    "(KServe's ModelInfer answers in one message: call it through fuseport's client, "
                    "which streams large results, or raise --max-message-bytes)"
                )
            elif keep or handles:  # the values below are what is over: no stream carries such a call
                way = (
                    "(a call that keeps its results or takes handles answers in one message: send fewer "
                    "values below the kernel's inputs)"
                )
            else:
                way = "(a stream carries it: ExecuteStream/FallbackStream)"
            raise ResultTooLarge(
                f"kernel {key}: the result would be {out} bytes{sent_back}, over the message limit of "
                f"{self.settings.max_message_bytes} bytes (--max-message-bytes); refused before running {way}"
            )
        if plan.largest_bytes > self.capacity:
            raise ResourceExhausted(
                f"{self.device} out of memory for kernel {key}: {plan.largest_what} needs "
                f"{plan.largest_bytes} bytes, more than the device's {self.capacity}; refused before running"
            )

    def describe(self, key: int, include_source: bool = False, tenant: bytes = b"") -> _pb.service.KernelInfo:
        registry = self.tenants.find(tenant, key)
        kernel = registry.get(key)
        return self._info(
            key, kernel.variants, include_source, with_arg_specs=True, registry=registry, tenant=tenant
        )

    def list(self, tenant: bytes = b"") -> list[_pb.service.KernelInfo]:
        """The kernels `tenant` sees: its own, and the shared ones its own do not shadow."""
        seen: set[int] = set()
        out = []
        for registry in self.tenants.visible(tenant):
            for key, variants in registry.kernels():
                if key not in seen:
                    seen.add(key)
                    out.append(self._info(key, variants, False, with_arg_specs=False, registry=registry))
        return sorted(out, key=lambda info: info.key)

    def unregister(self, key: int, tenant: bytes = b"") -> bool:
        registry = self.tenants.find(tenant, key)
        if tenant and registry is self.registry and self.registry.knows(key):
            raise PermissionDenied(
                f"kernel {key} is shared (an admin registered it): only an admin unregisters it"
            )
        # Registry first: once the key is gone no new request can compile for it.
        kernel = registry.remove(key)
        if kernel is None:
            return False
        self._forget(kernel)
        return True

    def fetch_handles(self, owner: Owner, ids: Sequence[str], free: bool = False) -> list[torch.Tensor]:
        """The owner's resident tensors of `ids`, on the host (freed after, with `free`)."""
        tensors = self.residents.fetch(owner, ids)
        total = sum(t.numel() * t.element_size() for t in tensors)
        limit = self.settings.max_message_bytes
        if total > limit:
            raise ResourceExhausted(
                f"fetching {len(ids)} handles is {total} bytes, over the message limit of {limit} bytes "
                "(--max-message-bytes); fetch fewer at once"
            )
        with self.placement.request_scope():
            self.placement.adopt(tensors)
            host = self.placement.to_host(tensors)
            self.placement.synchronize()
        if free:
            self.residents.free(owner, ids)
        return host  # type: ignore[no-any-return]

    def free_handles(self, owner: Owner, ids: Sequence[str], everything: bool = False) -> tuple[int, int]:
        """(handles, bytes) freed: `ids`, all or none, or every handle of the owner."""
        return self.residents.free(owner, None if everything else ids)

    def release_handles(self, owner: Owner, ids: Sequence[str]) -> None:
        """Frees the owner's handles among `ids`, skipping the others (see
        Residents.release): the dropped handles a call carries."""
        self.residents.release(owner, ids)

    def renew_lease(self, owner: Owner) -> _pb.service.ResidentUsage:
        return self._usage(self.residents.renew(owner))

    def resident_info(self, owner: Owner) -> _pb.service.ResidentInfo:
        totals = self.residents.totals()
        return _pb.service.ResidentInfo(
            server=self.residents.server,
            handles=totals.handles,
            bytes=totals.bytes,
            clients=totals.clients,
            budget_bytes=self.residents.budget_bytes,
            caller=self._usage(self.residents.usage(owner)),
        )

    def _usage(self, usage: Any) -> _pb.service.ResidentUsage:
        r = self.residents
        return _pb.service.ResidentUsage(
            handles=usage.handles,
            bytes=usage.bytes,
            lease_seconds=r.lease_seconds,
            quota_bytes=r.quota_bytes,
            max_handles=r.max_handles,
            frees_with_calls=True,
        )

    def _forget(self, kernel: Kernel) -> None:
        """Drops the compiled kernels of a removed kernel (those no other kernel shares)."""
        # Compiled kernels are keyed by graph content: another namespace may hold the same graph.
        still_used = {k for registry in self.tenants.all() for k in registry.variant_keys()}
        gone = [v.key for v in kernel.variants if v.key not in still_used]
        if self.batcher is not None:
            gone += self.batcher.forget(gone)  # and the batched graphs' compiled kernels
        self.executor.forget(kernel.key, gone)
        self.watchdog.forget(kernel.key)

    def close(self) -> None:
        self.watchdog.close()
        if self.batcher is not None:
            self.batcher.close()
        self.executor.shutdown()
        self.residents.close()
        self.shared.close()

    # ------------------------------------------------------------------ names and signatures

    def resolve(self, name: str) -> int:
        """The key of the kernel `name` stands for: its alias, or its key in decimal."""
        key = self.registry.resolve(name)
        if key is None and _DECIMAL.fullmatch(name) and -(1 << 63) <= int(name) < (1 << 63):
            key = int(name)
        if key is None or not self.registry.knows(key):
            shown = repr(name[:80] + ("..." if len(name) > 80 else ""))
            raise KernelNotFound(f"no kernel named {shown}: neither an alias nor a registered key", key)
        return key

    def signature(self, key: int) -> Signature:
        """The inputs of the kernel's own graph (its variants take as many)."""
        return self.registry.get(key).variants[0].signature

    def models(self) -> list[tuple[int, str | None, Signature]]:
        """Every kernel: key, alias, signature of its own graph (stored graphs are read, not built)."""
        return [(key, self.registry.alias_of(key), variants[0].signature) for key, variants in self.registry.kernels()]

    def outputs(self, key: int) -> tuple[InputSpec | None, ...] | None:
        """What the kernel's own graph returns, named output0, output1, ...: per output
        its kind, and for a tensor its dtype and shape (-1 where the size follows the
        inputs'), planned on meta tensors at example sizes; None for an output, or for
        all, where planning cannot tell (sizes that depend on data, no example size
        meets the graph's conditions)."""
        variant = self.registry.get(key).variants[0]
        if variant.key not in self._outputs:
            self._outputs[variant.key] = _planned_outputs(variant)
        return self._outputs[variant.key]

    def inject_device_fault(self) -> None:
        """FUSEPORT_FAULT_INJECTION (tests only): breaks this process's device on
        purpose (on CUDA a real device-side assert, which poisons the context), then
        handles the error as any call's: see _device_failed. The caller is the culprit."""
        if not self.settings.fault_injection:
            raise RuntimeError("fault injection is off (FUSEPORT_FAULT_INJECTION)")
        with self._failure_lock:
            self._injecting += 1  # a call that meets the failure meanwhile is not its cause
        try:
            with self.placement.request_scope():
                break_device(self.device)
                self.placement.synchronize()
        except Exception as e:
            if is_device_failure(e):
                self._device_failed(e, culprit=True)
            raise
        finally:
            with self._failure_lock:
                self._injecting -= 1
        raise InternalError(f"the injected fault left device {self.device} working")

    def _device_failed(self, e: BaseException, culprit: bool | None = None) -> None:
        """The device is unusable for this process: say so, and have the server
        stop (health NOT_SERVING, drain, exit non-zero) so that its supervisor
        starts a fresh one. Registered kernels are on disk and survive that.

        The call that met the failure first (`culprit` None: unless a deliberate
        fault is under way) may have caused it: it fails with INTERNAL, never
        retried, since a retry could take the next process's device down with
        it. Every other call that meets the failure, or arrives after it, did
        not run: UNAVAILABLE, which the client retries on another process."""
        with self._failure_lock:
            first = not self.device_failed
            self.device_failed = True
            if culprit is None:
                culprit = first and not self._injecting
        if first:
            log.error("device %s failed; this server must restart: %s", self.device, e)
            if self.on_device_failure is not None:
                self.on_device_failure()
        if culprit:
            raise InternalError(
                f"device {self.device} failed running this call, and this serving process is restarting; "
                f"the call is not retried, as it may have caused the failure: {str(e).splitlines()[0]}"
            ) from e
        raise self._device_gone() from e

    def _runaway(self, watch: Watch) -> None:
        """A kernel runs on past its call's limit and the grace (server/watchdog.py,
        which logged it): only this process's end stops it. The process retires
        the way it does after a device fault (see _device_failed), but nothing is
        broken: calls under way finish, only new ones go elsewhere. Its caller is
        penalised first (server/penalties.py), so that the processes that serve
        meanwhile, and this one's replacement, refuse its next heavy calls."""
        try:
            self.penalties.strike(watch.who, watch.key)
        except OSError:  # a full disk must not keep the process from retiring
            log.exception("kernel %d: recording its caller's runaway penalty failed", watch.key)
        if self.on_runaway is not None:
            self.on_runaway()

    def _device_gone(self) -> Unavailable:
        return Unavailable(
            f"device {self.device} of this serving process failed (another call's fault) and the process "
            "is restarting: this call did not complete; retry it (another process serves it)"
        )

    # ------------------------------------------------------------------ helpers

    def _tenant_registry(self, directory: Path) -> Registry:
        registry = Registry(
            directory, self.device, self.registry.quotas, shared=self.registry.shared, capacity=self.capacity
        )
        registry.on_removed = self._forget
        return registry

    def _own(self, tenant: bytes) -> Registry:
        own = self.tenants.own(tenant, create=True)
        assert own is not None
        return own

    def _info(
        self,
        key: int,
        variants: Sequence[Variant | Summary],
        include_source: bool,
        with_arg_specs: bool,
        registry: Registry | None = None,
        tenant: bytes = b"",
    ) -> _pb.service.KernelInfo:
        fused, fallback = self.executor.counts(key)
        first = variants[0]
        info = _pb.service.KernelInfo(
            key=key,
            inputs=list(first.graph.inputs),
            num_outputs=len(first.graph.outputs),
            num_nodes=len(first.graph.nodes),
            ops=sorted({op for v in variants for op in v.ops}),
            fused_runs=fused,
            fallback_runs=fallback,
            device=str(self.device),
            random_ops=sorted({op for v in variants for op in v.random_ops}),
            alias=(registry or self.registry).alias_of(key) or "",
            batching_off=self.batching_off(key, registry),
            overruns=self.watchdog.overruns_by_key.get(key, 0),
        )
        batched: set[int] = set()
        if self.batcher is not None and with_arg_specs:
            for vkey, verdict in self.batcher.verdicts(tenant, key, [v.key for v in variants]):
                keys = sorted(v.key for v in verdict.variants.values() if v is not None)
                batched.update(keys)
                info.batching.add(
                    variant=vkey, sizes=verdict.sizes, batchable=verdict.batchable, reason=verdict.reason,
                    batched_variants=keys, dynamic=verdict.dynamic,
                )  # fmt: skip
        for v in variants:
            info.variants.add(
                variant=v.key,
                inputs=list(v.graph.inputs),
                conditions=[c.text for c in v.signature.conditions],
                num_nodes=len(v.graph.nodes),
            )
        if not with_arg_specs:
            return info
        # The batched graphs' ArgSpecs too: compiled (and failing) like any other.
        for vkey in [v.key for v in variants] + sorted(batched):
            for e in self.executor.entries(vkey):
                info.arg_specs.add(
                    arg_spec=str(e.arg_spec),
                    state=e.state.value,
                    error=e.error,
                    compile_seconds=e.compile_seconds if e.state is not State.COMPILING else 0.0,
                    fused_runs=e.fused_runs,
                    fallback_runs=e.fallback_runs,
                    source=e.source if include_source else "",
                    variant=vkey,
                    compiled_by=e.compiled_by,
                    from_cache=e.from_cache,
                )
        return info


def _planned_outputs(variant: Variant) -> tuple[InputSpec | None, ...] | None:
    for pair in _EXAMPLE_SIZES:
        planned = []
        for size in pair:
            args = example_args(variant.signature, size)
            plan = None if args is None else variant.planner.plan(args)
            if plan is None or plan.error is not None or plan.outputs is None:
                break
            planned.append(plan.outputs)
        if len(planned) == 2:
            return tuple(_merged(f"output{i}", a, b) for i, (a, b) in enumerate(zip(*planned)))
    return None


def _merged(name: str, a: Any, b: Any) -> InputSpec | None:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.dim() != b.dim():
            return None
        return InputSpec(name, "tensor", a.dtype, tuple(x if x == y else -1 for x, y in zip(a.shape, b.shape)))
    for kind, cls in (("bool", bool), ("int", int), ("float", float)):
        if type(a) is cls and type(b) is cls:
            return InputSpec(name, kind)  # type: ignore[arg-type]
    return None


def _own_inputs(plan: Plan, args: list[Any], views: dict[int, torch.Tensor], keep: bool) -> list[Any]:
    """`args` with the inputs that must not stay in a client's shared-memory region
    (`views`) copied into server memory: the client may rewrite its region while the
    call runs, so bytes a check reads must be the bytes the kernel reads. Those are
    the operands of the plan's data checks; and every input where a check reads a
    value the graph computes (`plan.checks_computed`: it may be a view of an input), where
    sizes depend on the data (planning stopped: an op sized its result by reading
    values), or where results are kept on the server (one may be a view of an input,
    and later calls would check it). Anything else only reads values no check
    depends on: a client that rewrites them changes its own results, nothing more."""
    if keep or plan.unfused or plan.checks_computed or plan.output_bytes is None:
        checked = set(range(len(args)))
    else:
        checked = {x for c in plan.input_checks for kind, x in c.operands if kind == "input"}
    if not checked:
        return args

    def own(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.clone() if views.get(id(v)) is v else v
        if isinstance(v, (list, tuple)):
            return type(v)(own(x) for x in v)
        return v

    return [own(a) if i in checked else a for i, a in enumerate(args)]


def _select(kernel: Kernel, values: list[Any], base: int, allowed: Sequence[int]) -> tuple[Variant, list[Any]]:
    """The first variant that covers `values` (the kernel's inputs, from stack
    position `base`), and the values as it takes them; NoMatchingVariant naming
    why each candidate does not."""
    wanted = set(allowed)
    candidates = [v for v in kernel.variants if not wanted or v.key in wanted]
    if not candidates:
        raise NoMatchingVariant(
            f"kernel {kernel.key} has none of the {len(wanted)} variants this client runs; "
            "the client captures one for these inputs"
        )
    failures: list[tuple[Variant, str]] = []
    for v in candidates:
        args, why = _match(kernel.key, v, values, base)
        if why is None:
            return v, args
        failures.append((v, why))
    if len(failures) == 1:
        raise NoMatchingVariant(failures[0][1])
    shown = "; ".join(f"variant {v.key}: {why}" for v, why in failures[:4])
    more = f"; and {len(failures) - 4} more" if len(failures) > 4 else ""
    raise NoMatchingVariant(f"no variant of kernel {kernel.key} covers these inputs: {shown}{more}")


def _match(key: int, variant: Variant, values: list[Any], base: int) -> tuple[list[Any], str | None]:
    sig = variant.signature
    args = []
    for i, (decl, value) in enumerate(zip(sig.inputs, values)):
        value, why = _check_input(decl, value)
        if why is not None:
            return [], f"stack[{base + i}] (input {i} {decl.name!r} of kernel {key}): {why}"
        args.append(value)
    for cond in sig.conditions:
        if not cond.holds(args):
            names = [d.name for d in sig.inputs]
            return [], (
                f"kernel {key}: {cond.text} does not hold ({cond.values(args, names)}): "
                "the graph was captured for inputs that meet it"
            )
    return args, None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Scalar input kinds: what to call them, and which Python values they accept.
_SCALARS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "bool": ("a bool", lambda v: isinstance(v, bool)),
    "int": ("an int", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a float", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
}


def _holds_tensors(values: list[Any]) -> bool:
    """Whether `values` (lists too) hold a tensor."""
    found: list[torch.Tensor] = []
    shm.walk(values, found.append)
    return bool(found)


def _handles(values: Sequence[Any]) -> Iterator[Handle]:
    """The Handles in `values` (lists too)."""
    for v in values:
        if isinstance(v, Handle):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _handles(v)


# Room for a tensor's header in a message (dtype, shape, dim order): at most this
# plus 10 bytes a dimension.
_TENSOR_HEADER = 32


def _response_bytes(values: Sequence[Any]) -> int:
    """At most what `values` take in a response message: a tensor's bytes and room for
    its header, anything else as encoded (a string below the inputs counts as its bytes)."""
    n = 0
    for v in values:
        if isinstance(v, torch.Tensor):
            n += v.numel() * v.element_size() + _TENSOR_HEADER + 10 * v.dim()
        elif isinstance(v, (list, tuple)):
            n += _response_bytes(v) + 16
        else:
            n += len(encode_stack([v]))
    return n


def _both_nan(a: Any, b: Any) -> bool:
    """NaN is not equal to itself: a graph specialised on NaN accepts NaN."""
    return bool(a != a and b != b)


def _check_input(decl: InputSpec, value: Any) -> tuple[Any, str | None]:
    """The stack value as the input takes it, or why it does not fit the declared input."""
    if decl.kind == "tensor":
        assert decl.dtype is not None and decl.shape is not None
        if not isinstance(value, torch.Tensor):
            return value, f"expected a tensor, got {_kind_name(value)}"
        if value.dtype != decl.dtype:
            return value, f"expected a {_dtype_name(decl.dtype)} tensor, got {_dtype_name(value.dtype)}"
        if len(decl.shape) != value.dim():
            return value, f"expected rank {len(decl.shape)}, got shape {list(value.shape)}"
        for d, (w, got) in enumerate(zip(decl.shape, value.shape)):
            if w >= 0 and w != got:
                return value, (
                    f"dim {d} must be {w} (the graph was specialised on it), got shape {list(value.shape)}"
                )
        return value, None
    expected, accepts = _SCALARS[decl.kind]
    if not accepts(value):
        return value, f"expected {expected}, got {_kind_name(value)}"
    if decl.kind == "float":
        value = float(value)
    if decl.static and value != decl.static_value and not _both_nan(value, decl.static_value):
        return value, (
            f"this input is static (the graph was specialised on it when captured): "
            f"only {decl.static_value!r} is accepted, got {value!r}"
        )
    return value, None


def _kind_name(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {_dtype_name(value.dtype)} tensor"
    if value is None:
        return "None"
    return f"a {type(value).__name__}"


class _Overran(Exception):
    """A run that ended after its caller was answered at its limit (Core.run drops its results)."""

    def __init__(self, watch: Watch) -> None:
        super().__init__(f"kernel {watch.key}: answered at its limit")
        self.watch = watch
