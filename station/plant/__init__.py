"""Plant-wide reporting: the station's MQTT publisher and metrics endpoint, the plant aggregator.

Topics and payloads: docs/PLANT.md.
"""
