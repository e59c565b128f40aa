"""Offline tagging of every user (`mvke tag-all`) on Ray Data; see batch/tag_all.py."""
