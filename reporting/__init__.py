"""What report.py reads from the runs' folders and the pages it writes."""
