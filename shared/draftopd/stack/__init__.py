"""``draftopd up``: the whole stack on one machine (``up``) and its process supervisor."""
