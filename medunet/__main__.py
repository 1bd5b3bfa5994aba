from medunet.cli.main import main

main()
