"""The lecture's own material, computed exactly by :mod:`dpokit.theory`.

    dpokit optimal --beta 0.5,1,2,5      # the worked example's π* across a β sweep
    dpokit partition                     # why Z is intractable: V^T growth, exact vs Monte Carlo
    dpokit figures --out out/figures     # every figure of the lecture, as PNGs

Modules: :mod:`~dpokit.lecture.outcomes` (outcome tables, the worked example and their π*),
:mod:`~dpokit.lecture.partition` (the partition-function study), :mod:`~dpokit.lecture.figures`
(the figures, drawn from those computations) and :mod:`~dpokit.lecture.config` (the three
commands' configs: their YAML keys and flags). Nothing is imported here, so ``config`` loads
without matplotlib.
"""
