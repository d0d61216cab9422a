from cosy.cli.main import main

main()
