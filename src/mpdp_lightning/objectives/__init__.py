"""Losses as functions of the nets and a batch: SAC's critic, actor and temperature losses, and
MPDP's H-step policy improvement through the world model."""
