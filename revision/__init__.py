"""Verdicts -> a revised model (torch side): `revise` the one way in (revise), the paper's Alg. 1
rounds with masking and pruning (rounds), each concept's file (masking, prune, refine,
simulated_user, terminal_review), the per-family hooks (families), and the registry job that
turns a version plus its verdicts into a candidate (job, with its nearest training images:
neighbours). Its settings are registry/revision_settings.py RevisionSettings."""
