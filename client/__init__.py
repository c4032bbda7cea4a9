"""The rank side of prefill-bootstrap: wire models, port sync, HTTP clients, the CLI.

Importing this package never imports torch (the port broadcast imports it when called) nor the
server's dependencies.
"""
