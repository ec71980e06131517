set -u
C=/work/main/.venv/bin/cvconvert
export OMP_NUM_THREADS=1
cd /tmp/m10
for v in random match; do
  $C convert lenet --data fashion-mnist --task fine --seed 0 -o lenet-$v --force
  $C train lenet-$v --data fashion-mnist --train-limit 12000 --epochs 2 --batch-size 64 --seed 0 --device cpu --defense exchange --fool-rule $v --json > train-$v.json
  $C eval lenet-$v --data fashion-mnist --device cpu --json > eval-$v.json
done
$C convert lenet --data fashion-mnist --task fine --seed 0 --variant original -o lenet-original --force
$C train lenet-original --data fashion-mnist --train-limit 12000 --epochs 2 --batch-size 64 --seed 0 --device cpu --json > train-original.json
$C eval lenet-original --data fashion-mnist --device cpu --json > eval-original.json
for v in random match; do
  $C attack lenet-$v --data fashion-mnist --task fine --baseline lenet-original --budget quick --device cpu -o audit-$v
done
echo ALLDONE
