"""Content filters through real peers: the milter protocol and client, rspamd (HTTP and milter), OpenDKIM."""
