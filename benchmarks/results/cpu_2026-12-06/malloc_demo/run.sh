#!/bin/bash
# malloc tunables on/off, run.py demo config (ResNet-18 w16, 128 px, 4 data threads), 3 epochs
cd /tmp/baseline_repo
PY=/work/main/.venv/bin/python
$PY run.py --config=configs/demo.py --workdir=/tmp/malloc/warm --config.num_epochs=1 > /tmp/malloc/warm.log 2>&1
for i in 1 2; do
 for t in on off; do
  rm -rf /tmp/malloc/wd_$t
  if [ $t = off ]; then export KPN_JAX_MALLOC_TUNABLES=0; else unset KPN_JAX_MALLOC_TUNABLES; fi
  s=$(date +%s.%N)
  /usr/bin/time -v $PY run.py --config=configs/demo.py --workdir=/tmp/malloc/wd_$t --config.num_epochs=4 --config.eval_every_epochs=4 > /tmp/malloc/${t}_$i.log 2>&1
  e=$(date +%s.%N)
  echo "$t $i wall $(echo "$e - $s" | bc)" >> /tmp/malloc/summary.txt
 done
done
