from lmtrain.cli import main

main()
