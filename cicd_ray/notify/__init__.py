"""What goes out when runs change: the signed notification document and where it may be sent
(`webhooks`), commit statuses on the git host (`statuses`).
"""
