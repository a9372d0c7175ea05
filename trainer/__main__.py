from trainer.cli import command

command()
