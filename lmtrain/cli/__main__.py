from lmtrain.cli.app import main

main()
