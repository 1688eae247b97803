"""``make fuzz``: hostile input against a running ``payhook serve`` (see fuzz.campaign)."""
