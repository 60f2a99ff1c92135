"""scale-shift: learned corrections of reused block values (:mod:`~bcc.scale_shift.params`,
:mod:`~bcc.scale_shift.train`) and the layout of cached tensors
(:mod:`~bcc.analyze.slots`: the :class:`CacheSlot` record and shape helpers, which the
graph passes import without importing training code)."""
