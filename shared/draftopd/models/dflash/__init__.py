"""The DFlash block-drafter family: one drafter pass proposes a whole block.

Code outside this package reaches it through the drafter seam (``models.drafter.Drafter``) and
the family registry (``models.families``).
"""
