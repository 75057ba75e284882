"""HeapFreezer: keep the garbage collector off the heap that exists while the engine has work.

CPython's collector is generational: once the youngest generation has seen ~700 net allocations it runs, and
now and then a full collection walks every tracked object in the process: the model's modules, the tokenizer,
torch's and the libraries' own objects, a few hundred thousand in all. Serving allocates per step and per request
at a rate that sets one off every hundred-odd steps, and each stalls the step loop for tens to hundreds of
milliseconds (measured by ``bench host_overhead``: 5 full collections of 260-350 ms in 2048 requests on a busy
2-core host), while the device waits. Almost nothing in that heap is ever garbage.

``gc.freeze()`` moves every tracked object to a permanent generation that collections skip; ``gc.unfreeze()``
hands them back. The engine freezes when it goes from idle to busy (its first request) and unfreezes when it is
idle again (its last request finished or aborted, or ``shutdown``): garbage that existed at the freeze is freed
at the next idle, never leaked for good, and no collection is forced (a full one costs what it saves). Freezing
is process-wide: with several busy engines in one process the first to go idle unfreezes for all, which only
costs the others the saving until their next busy period.
"""

from __future__ import annotations

import gc


class HeapFreezer:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.frozen = False

    def busy(self) -> None:
        """The engine has work: freeze what exists (O(1): CPython splices its generation lists)."""
        if self.enabled and not self.frozen:
            gc.freeze()
            self.frozen = True

    def idle(self) -> None:
        """The engine has no work left: give the frozen objects back to the collector."""
        if self.frozen:
            gc.unfreeze()
            self.frozen = False
