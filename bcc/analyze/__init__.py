"""analyze: find the cacheable blocks of a captured graph (:mod:`bcc.analyze.blocks`) and
decide, once for every user, which block input each block output is a residual of
(:mod:`bcc.analyze.residual`)."""
