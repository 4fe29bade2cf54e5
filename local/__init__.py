"""Run the whole system without the cloud: API, event-source bridge, sweeper, fake provider."""
