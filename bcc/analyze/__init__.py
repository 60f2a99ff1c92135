"""analyze: find the cacheable blocks of a captured graph (:mod:`bcc.analyze.blocks`)."""
