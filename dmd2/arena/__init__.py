"""The arena: anonymous A/B battles, votes in SQLite, Bradley-Terry leaderboard."""

from dmd2.arena.battles import (Battle, BattleBook, InvalidToken, NotVotable, issue_token, new_battle,
                                pick_pair, verify_token)
from dmd2.arena.ratings import leaderboard, win_rate_matrix, win_rate_plot
from dmd2.arena.store import DuplicateVote, RateLimited, VoteStore, default_votes_path, read_csv, read_jsonl

__all__ = ["Battle", "BattleBook", "DuplicateVote", "InvalidToken", "NotVotable", "RateLimited",
           "VoteStore", "default_votes_path", "issue_token", "leaderboard", "new_battle", "pick_pair", "read_csv",
           "read_jsonl", "verify_token", "win_rate_matrix", "win_rate_plot"]
