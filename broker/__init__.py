"""The cosy broker: client front end, worker back end, audio forwarder."""
