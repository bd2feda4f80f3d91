"""What the processes of allcores tell each other about themselves, without messages."""
