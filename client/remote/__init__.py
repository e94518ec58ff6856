"""The job on the instance, seen from the laptop: the bundle and data it needs, set-up and the model download, launching under tmux, following its files, its guard."""
