"""Matcher core: preprocessing, networks, backends, post-processing. No ROS imports here."""
